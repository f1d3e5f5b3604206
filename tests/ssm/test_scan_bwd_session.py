"""The plumbing of benchmarks/scan_bwd_session.py (the scan-backward GPU session), on the CPU:
the variants are complete and distinct, every implementation compared at one (L, dtype) gets the
same inputs and upstream gradient (the cross-check of 2026-12-01 20:49 did not: √2 on every
gradient), and the tables render from a results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import scan_bwd_session as sbs  # noqa: E402


def test_variants_spell_out_every_key_and_differ():
    for variants in (sbs.train_variants(), sbs.fwd_variants()):
        seen = set()
        for name, v in variants.items():
            assert set(v["fwd"]) == set(sbs.MAIN_FWD), name
            assert set(v["fwd_train"]) == set(sbs.MAIN_FWD), name
            assert set(v["bwd"]) == set(sbs.MAIN_BWD), name
            key = json.dumps(v, sort_keys=True)
            assert key not in seen, f"{name} repeats another variant"
            seen.add(key)
    assert sbs.train_variants()["main"]["bwd"] == sbs.MAIN_BWD
    keys = [sbs.task_key(t) for t in sbs.tasks()]
    assert len(keys) == len(set(keys))


def test_carry_sets_are_complete_and_distinct_and_their_best_is_the_default():
    """The "carry" sets start from the shapes of before 2026-12-04 (pinned); the module's
    defaults now are the measured bests (carry2's; fp32's inference forward from call 5)."""
    from tsssm.ssm import scan_triton as st

    for dt, which in ((dt, w) for dt in sbs.DTYPES for w in ("carry", "carry2")):
        for variants in (sbs.train_variants(dt, which), sbs.fwd_variants(dt, which)):
            main = variants["main"]
            assert {k: v for k, v in main["bwd"].items() if v} == {
                k: v for k, v in sbs.BWD_BEFORE_CARRY.items() if v}
            seen = set()
            for name, v in variants.items():
                for kind in ("fwd", "fwd_train", "bwd"):
                    assert set(v[kind]) == set(main[kind]), (name, kind)
                key = json.dumps(v, sort_keys=True)
                assert key not in seen, f"{name} repeats another variant"
                seen.add(key)
        keys = [sbs.task_key(t) for t in sbs.tasks(which=which)]
        assert len(keys) == len(set(keys))

    def active(cfg):  # a switch at 0 is the switch absent
        return {k: v for k, v in cfg.items() if v}

    best_train = "fwd carry mr128, bwd carry+rowatomic d2"
    # the inference forward: carry2's best in bf16; in fp32 device call 5's (fwd_unroll.py)
    # "carry unroll 8 mr128", on the same base
    call5 = dict(CARRY_IN_SCAN=1, UNROLL=8, MAXNREG=128)
    for dt, best_fwd, over in (("bfloat16", "carry", {}), ("float32", "main", call5)):
        dtype = getattr(torch, dt)
        train = sbs.train_variants(dt, "carry2")[best_train]
        fwd = {**sbs.fwd_variants(dt, "carry2")[best_fwd]["fwd"], **over}
        assert active(st.launch_config("fwd", dtype)) == active(fwd), dt
        assert active(st.launch_config("fwd_train", dtype)) == active(train["fwd_train"]), dt
        assert active(st.launch_config("bwd", dtype)) == active(train["bwd"]), dt


def test_every_implementation_gets_the_same_inputs_and_dout(tmp_path):
    s = sbs.Session(tmp_path, budget_s=1.0, dry=True)
    s.logf.close()
    a, da = sbs.inputs(s, 32, torch.float32)
    torch.randn(100)  # the global generator moves between the two draws
    b, db = sbs.inputs(s, 32, torch.float32)
    assert torch.equal(da, db)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _, other = sbs.inputs(s, 48, torch.float32)
    assert other.shape[-1] == 48


def test_tables_render_from_results(tmp_path):
    row = dict(impl="tsssm best", dtype="bfloat16", L=16384, fwd_ms=2.0, fwd_bwd_ms=10.0,
               bwd_ms=8.0, fwd_bwd_peak_MB=400.0, fwd_x_floor=8.0, fwd_bwd_x_floor=18.0)
    mamba = dict(row, impl="mamba-ssm", fwd_ms=3.0, fwd_bwd_ms=12.0, bwd_ms=9.0,
                 rel_err_vs="tsssm best", rel_err={"out": 3e-5, "du": 2e-5})
    results = {"device": "H200", "copy_bandwidth_Bps": 4.2e12, "verified": {
        "train|bfloat16|main": {"ok": True, "worst_rel_err": 1e-3}},
        "sections": {"table": [row], "mamba": [mamba]}, "mamba_status": "importable"}
    sbs.write_tables(tmp_path, results)
    text = (tmp_path / "table.md").read_text()
    assert "| tsssm best | bfloat16 | 16384 | 2 |" in text
    assert "| 1.50 | 1.20 | 1.12 |" in text  # mamba-ssm / tsssm: fwd, fwd+bwd, bwd
    assert "mamba-ssm vs tsssm best (bfloat16 L 16384): out 3.0e-05, du 2.0e-05" in text
