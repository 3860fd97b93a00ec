"""Every fenced example in README.md and docs/*.md is executed or checked, so the docs cannot
drift from the code:
- python blocks run: offline ones against the default model (one shared float32 `LLM`), ones
  that talk to 127.0.0.1:8000 against a real server on a free port;
- bash blocks: `curl` commands are sent to that server (a `| grep` after them must match),
  `conveyor ...` and `python -m benchmarks...` command lines must parse with the real argument
  parsers (`conveyor hash-key` runs), `./install.sh` and scripts must exist;
- toml blocks must parse and name only known config fields, json blocks must parse.
A block that cannot run here is marked in the Markdown, on the line before its fence, with
`<!-- docs-test: skip REASON -->`; there may be only a few such blocks."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import re
import shlex
import sys
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.test_server_harness import ServerThread

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
MAX_SKIPPED = 4
DOC_HOST = "http://127.0.0.1:8000"


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}:{self.lang}"


def fenced_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = SKIP_MARKER.search(lines[i - 1]) if i else None
            blocks.append(Block(path, i + 1, m.group(1) or "text", "\n".join(lines[i + 1:end]) + "\n",
                                marker.group(1).strip() if marker else None))
            i = end + 1
    return blocks


BLOCKS = fenced_blocks()


def test_few_blocks_are_marked_not_runnable():
    skipped = [b.id for b in BLOCKS if b.skip_reason is not None]
    assert len(skipped) <= MAX_SKIPPED, f"too many blocks marked docs-test: skip: {skipped}"
    assert all(b.skip_reason for b in BLOCKS if b.skip_reason is not None), "a skip marker needs a reason"
    assert len(BLOCKS) >= 10  # the extraction itself works


# ---- servers and the shared offline LLM ------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    """The default model behind `conveyor serve`'s app with no config, on a free port."""
    from engine.async_engine import AsyncEngine
    from engine.config import EngineConfig

    engine = AsyncEngine(EngineConfig(dtype="float32", num_blocks=256, max_num_seqs=8))
    thread = ServerThread(engine).start(timeout=300)
    yield thread
    thread.stop()


def _local(text: str, server: ServerThread) -> str:
    return text.replace(DOC_HOST, server.base_url)


# ---- python ---------------------------------------------------------------------------------
def _run_python(block: Block, namespace_patch: dict | None = None) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.text, block.id, "exec"), {"__name__": "__docs__", **(namespace_patch or {})})
    return out.getvalue()


def _offline_llm_factory(shared):
    import engine.llm

    real = engine.llm.LLM

    def LLM(model=None, **kwargs):  # noqa: N802 - stands in for the class
        return shared if model is None and not kwargs else real(model, **kwargs)

    return LLM


PY_BLOCKS = [b for b in BLOCKS if b.lang == "python" and b.skip_reason is None]


@pytest.mark.parametrize("block", [b for b in PY_BLOCKS if DOC_HOST not in b.text], ids=lambda b: b.id)
def test_offline_python_examples_run(block, default_llm, monkeypatch):
    import engine.llm

    # `LLM()` (the default model) is the suite's shared instance: loading it again would only
    # cost time; any other arguments build a real new LLM.
    monkeypatch.setattr(engine.llm, "LLM", _offline_llm_factory(default_llm))
    out = _run_python(block)
    if "The capital of France is" in block.text and "temperature=0" in block.text:
        assert "Paris" in out, out


@pytest.mark.parametrize("block", [b for b in PY_BLOCKS if DOC_HOST in b.text], ids=lambda b: b.id)
def test_client_python_examples_run(block, server):
    out = _run_python(Block(block.path, block.line, block.lang, _local(block.text, server), None))
    assert out.strip()


# ---- bash -----------------------------------------------------------------------------------
def _commands(text: str) -> list[list[list[str]]]:
    """Shell commands of a block as pipelines of word lists: comments dropped, continuation
    lines joined, `&&` and `|` split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands, pending = [], ""
    for line in joined.splitlines():
        line = (pending + " " + line).strip() if pending else line.strip()
        pending = ""
        if not line or line.startswith("#"):
            continue
        try:
            commands += _split_ops(line)
        except ValueError:  # an open quote: the command goes on on the next line
            pending = line
    assert not pending, f"unbalanced quotes in: {pending}"
    return [c for c in commands if c and c[0]]


def _split_ops(line: str) -> list[list[list[str]]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, pipeline, words = [], [], []
    for token in lexer:
        if token == "&&":
            commands.append(pipeline + [words])
            pipeline, words = [], []
        elif token == "|":
            pipeline.append(words)
            words = []
        else:
            words.append(token)
    commands.append(pipeline + [words])
    return commands


class _Parsed(Exception):
    pass


def _parses(module: str, argv: list[str], monkeypatch) -> None:
    """Runs `python -m module argv` only up to its argument parsing: the parse must succeed."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    mod = importlib.import_module(module if module != "conveyor" else "conveyor.cli")
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [module, *argv])
        with pytest.raises(_Parsed):
            mod.main(argv) if module == "conveyor" else mod.main()


def _curl(words: list[str], server: ServerThread) -> str:
    method, url, headers, data = "GET", None, {}, None
    it = iter(words[1:])
    for w in it:
        if w in ("-H", "--header"):
            key, _, value = next(it).partition(":")
            headers[key.strip()] = value.strip()
        elif w in ("-d", "--data", "--data-raw"):
            data, method = next(it), "POST" if method == "GET" else method
        elif w == "-X":
            method = next(it)
        elif w.startswith("http"):
            url = _local(w, server)
        elif not w.startswith("-"):
            raise AssertionError(f"unexpected curl argument {w!r}")
    assert url, words
    r = httpx.request(method, url, headers=headers, content=data, timeout=120)
    assert r.status_code < 400, f"{shlex.join(words)} -> {r.status_code}: {r.text[:500]}"
    return r.text


BASH_BLOCKS = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell") and b.skip_reason is None]


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: b.id)
def test_shell_examples(block, request, monkeypatch):
    for pipeline in _commands(block.text):
        words = pipeline[0]
        command = " | ".join(shlex.join(w) for w in pipeline)
        if words[0] == "curl":
            out = _curl(words, request.getfixturevalue("server"))
            for grep in pipeline[1:]:
                assert grep[0] == "grep", f"{block.id}: only grep may follow curl, got {command!r}"
                assert re.search(grep[-1], out, re.M), f"{block.id}: {command!r} matches nothing in {out[:300]!r}"
        elif words[0] == "conveyor" and words[1:2] == ["hash-key"]:
            from conveyor.cli import main

            assert main(words[1:]) == 0
        elif words[0] == "conveyor":
            _parses("conveyor", words[1:], monkeypatch)
        elif words[:2] in (["python", "-m"], ["python3", "-m"]) and words[2].startswith("benchmarks."):
            _parses(words[2], words[3:], monkeypatch)
        elif words[:3] in (["python", "-m", "pytest"], ["python3", "-m", "pytest"]):
            assert (ROOT / words[3]).exists()
        elif words[0].startswith("./") or words[0] == "bash":
            script = ROOT / (words[1] if words[0] == "bash" else words[0])
            assert script.is_file(), f"{block.id}: {script} does not exist"
        else:
            raise AssertionError(f"{block.id}: no way to check {command!r}; fix the example or mark "
                                 "the block <!-- docs-test: skip REASON -->")


# ---- config and data ------------------------------------------------------------------------
def _known_fields(tp, value, where: str) -> list[str]:
    """Names in `value` that the dataclass `tp` (recursively) does not have."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        bad = [f"{where}.{k}" for k in value if k not in hints]
        return bad + [b for k, v in value.items() if k in hints for b in _known_fields(hints[k], v, f"{where}.{k}")]
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [b for i, v in enumerate(value) for b in _known_fields(item, v, f"{where}[{i}]")]
    if typing.get_origin(tp) is dict and isinstance(value, dict):
        _, item = typing.get_args(tp)
        return [b for k, v in value.items() for b in _known_fields(item, v, f"{where}.{k}")]
    return []


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("toml", "json", "yaml") and b.skip_reason is None],
                         ids=lambda b: b.id)
def test_config_and_data_examples_parse(block):
    from server.config_file import ProductionConfig

    if block.lang == "json":
        json.loads(block.text)
        return
    data = tomllib.loads(block.text) if block.lang == "toml" else __import__("yaml").safe_load(block.text)
    fields = {f.name for f in dataclasses.fields(ProductionConfig)}
    if isinstance(data, dict) and set(data) & fields:  # a Conveyor config (not, e.g., Prometheus's)
        assert not _known_fields(ProductionConfig, data, "config")


def test_example_config_keys_match_their_digests():
    """The example API keys printed in docs/conveyor.example.toml's comments work."""
    from server.auth import hash_key
    from server.config_file import load_config

    path = ROOT / "docs" / "conveyor.example.toml"
    config = load_config(path)
    listed = dict(re.findall(r"^#\s+([\w-]+)\s+(sk-[\w-]+)", path.read_text(), re.M))
    assert sorted(listed) == sorted(t.name for t in config.tenants)
    for tenant in config.tenants:
        assert hash_key(listed[tenant.name]) in tenant.api_key_sha256, tenant.name
