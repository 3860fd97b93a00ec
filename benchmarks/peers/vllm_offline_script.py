"""Standalone: runs inside vLLM's own venv (it imports nothing from this repository).

    python vllm_offline_script.py MODEL_DIR WORKLOAD_JSON OUT_JSON DTYPE MAX_MODEL_LEN

Generates the workload with `vllm.LLM.generate` (token-id prompts, ignore_eos) and writes a
`RunResult`-shaped JSON: wall time, per-request records, and the peak resident memory summed
over this process and its children (vLLM runs its engine core in a child process)."""
import json
import os
import sys
import time


def tree_pids() -> set:
    pids, frontier = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in pids:
                pids.add(c)
                frontier.append(c)
    return pids


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    total = 0
    for pid in tree_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def tree_peak_bytes() -> int:
    total = 0
    for pid in tree_pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total


def main() -> None:
    model_dir, wl_path, out_path, dtype, max_len = sys.argv[1:6]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(wl_path) as f:
        wl = json.load(f)
    reqs = wl["requests"]
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=int(max_len), seed=0)
    llm.generate([TokensPrompt(prompt_token_ids=reqs[0]["prompt_ids"][:16])],
                 SamplingParams(max_tokens=4, ignore_eos=True, temperature=0), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in reqs]
    params = [SamplingParams(max_tokens=r["output_len"], min_tokens=r["output_len"], ignore_eos=True,
                             temperature=0) for r in reqs]
    t0, c0 = time.time(), tree_cpu_seconds()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, cpu = time.time() - t0, tree_cpu_seconds() - c0
    records = []
    for r, o in zip(reqs, outs):
        n = len(o.outputs[0].token_ids)
        # offline vLLM reports no per-request timestamps by default: TTFT unknown, e2e = wall
        records.append({"prompt_len": len(r["prompt_ids"]), "output_len": n, "ttft": None, "e2e": wall,
                        "itls": [], "error": None if n == r["output_len"] else f"got {n} tokens"})
    result = {"system": "vllm-offline", "workload": wl["name"], "wall_s": wall, "records": records,
              "peak_mem_bytes": tree_peak_bytes(), "skipped": None, "notes": {"cpu_s": round(cpu, 3)}}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
