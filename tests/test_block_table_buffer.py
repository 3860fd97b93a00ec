"""The runner's persistent block tables (engine/block_table_buffer.py) always equal the tables
built from scratch, through growth, preemption (a new list), reuse of rows and absent sequences."""
import random

import numpy as np

from engine.attention_metadata import AttentionMetadata
from engine.block_table_buffer import BlockTableBuffer


def reference(tables: list[list[int]]) -> np.ndarray:
    width = max((len(t) for t in tables), default=1) or 1
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def test_rows_match_tables_built_from_scratch():
    rng = random.Random(0)
    buf = BlockTableBuffer(num_rows=2, num_cols=2)  # small: exercises growth in both directions
    live: dict[str, list[int]] = {}
    next_id = 0
    for step in range(300):
        action = rng.random()
        if action < 0.15 or not live:  # admit
            live[f"r{next_id}"] = [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
            next_id += 1
        elif action < 0.25:  # finish
            live.pop(rng.choice(sorted(live)))
        elif action < 0.30:  # preempted and re-admitted: the manager hands a new, shorter list
            rid = rng.choice(sorted(live))
            live[rid] = [rng.randrange(1000) for _ in range(rng.randrange(1, 4))]
        for t in live.values():  # decode: tables grow in place
            if rng.random() < 0.3:
                t.append(rng.randrange(1000))
        ids = sorted(live, key=lambda _: rng.random())  # batch order changes step to step
        if rng.random() < 0.2 and len(ids) > 1:
            ids = ids[:-1]  # one running sequence left out of this step (budget)
        tables = [live[i] for i in ids]
        got = buf.rows(ids, tables)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, reference(tables), err_msg=f"step {step}")


def test_metadata_from_buffer_equals_metadata_from_lists():
    tables = [[3, 9], [4], [7, 1, 2]]
    q, s = [1, 1, 20], [20, 5, 40]
    a = AttentionMetadata.build(q, s, tables, 16)
    b = AttentionMetadata.build(q, s, tables, 16, block_table_array=BlockTableBuffer().rows(["a", "b", "c"], tables))
    for name in ("block_tables", "slot_mapping", "positions", "seq_lens", "query_start_loc"):
        assert getattr(a, name).dtype == getattr(b, name).dtype
        assert bool((getattr(a, name) == getattr(b, name)).all()), name
