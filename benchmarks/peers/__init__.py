"""The systems the throughput benchmark compares: Conveyor (continuous and static batching) and
its peers (transformers static and continuous batching, llama.cpp's server, vLLM's CPU build).
In-process systems run in a child process (`child.py`) so each gets a clean heap and its own
peak-memory figure; servers are driven over HTTP (`openai_http.py`)."""
