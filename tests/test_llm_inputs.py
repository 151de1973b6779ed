"""What LLM users bring (issue 19): a folder of Trainer checkpoints merges in training order (natural
order, not name order), and an expert that stores a tied ``lm_head.weight`` the base does not store
is accepted when the head is the embedding (the duplicate is dropped and logged), refused with a
clear reason when it is not."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergewatch import config
from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.daemon.inbox import Inbox, natural_key
from mergewatch.errors import IncompatibleExpertError
from mergewatch.workspace import Workspace
from tests.hf_support import load_and_run, low_rank_experts, tiny_gpt2, tiny_qwen3
from tests.helpers import load_all, make_expert, make_open_clip_base

REPO = Path(__file__).resolve().parent.parent


def _workspace(tmp: Path, base: Path, policy: str = 'init = "ema"\ndeploy = "ema"') -> Workspace:
    p = tmp / "mw.toml"
    p.write_text(f'workspace = "ws"\nbase = "{base}"\n[policy]\n{policy}\n', "utf-8")
    return Workspace(config.load(p))


# Natural order ---------------------------------------------------------------------------------
def test_natural_key_orders_digit_runs_by_value():
    names = ["checkpoint-1000", "checkpoint-200", "checkpoint-30", "checkpoint-200b", "a10b2", "a10b10", "a9", "x01", "x1"]
    assert sorted(names, key=natural_key) == [
        "a9", "a10b2", "a10b10", "checkpoint-30", "checkpoint-200", "checkpoint-200b", "checkpoint-1000", "x01", "x1"
    ]


def test_trainer_checkpoint_folder_merges_in_training_order(tmp_path):
    """``mergewatch merge runs/`` over Trainer's checkpoint-N folders (model.safetensors beside
    optimizer.pt, trainer_state.json, ...): step order follows N, so an EMA sees them in time order."""
    base = make_open_clip_base(tmp_path / "base.safetensors")
    runs = tmp_path / "runs"
    for i, n in enumerate((1000, 200, 30, 4000), 1):
        d = runs / f"checkpoint-{n}"
        d.mkdir(parents=True)
        make_expert(base, d / "model.safetensors", seed=i)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": n}), "utf-8")
        (d / "optimizer.pt").write_bytes(b"PK\x03\x04 not loaded")
    cfg = tmp_path / "mw.toml"
    cfg.write_text('workspace = "ws"\nbase = "base.safetensors"\n[policy]\ninit = "ema"\ndeploy = "ema"\n', "utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "mergewatch.cli", "merge", "--config", str(cfg), str(runs), "--json"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout[r.stdout.index("["):])
    assert [Path(s["path"]).name for s in summary] == ["checkpoint-30", "checkpoint-200", "checkpoint-1000", "checkpoint-4000"]
    manifest = json.loads((tmp_path / "ws" / "deploy" / "current" / "MANIFEST.json").read_text())
    assert manifest["expert_names"] == ["checkpoint-30", "checkpoint-200", "checkpoint-1000", "checkpoint-4000"]
    # the user's folders are untouched
    assert all((runs / f"checkpoint-{n}" / "model.safetensors").is_file() for n in (30, 200, 1000, 4000))


def test_inbox_orders_drops_that_arrive_together_naturally(tmp_path):
    inbox = Inbox(tmp_path / "inbox", quiet_seconds=0)
    t = 1_700_000_000
    for name in ("checkpoint-1000.safetensors", "checkpoint-200.safetensors", "checkpoint-30.safetensors"):
        p = inbox.root / name
        p.write_bytes(b"x")
        os.utime(p, (t, t))  # a startup scan sees them all with one mtime
    inbox.scan()
    with inbox._lock:  # one arrival instant for all (the scan's clock may tick between entries)
        for name in inbox._candidates:
            inbox._candidates[name] = 0.0
    assert [d.name for d in inbox.ready(now=t + 10)] == [
        "checkpoint-30.safetensors", "checkpoint-200.safetensors", "checkpoint-1000.safetensors"
    ]


# Tied embeddings -------------------------------------------------------------------------------
def _with_head(expert: dict, emb: str, head: str = "lm_head.weight", delta: float = 0.0) -> dict:
    return {**expert, head: expert[emb] + delta if delta else expert[emb].clone()}


@pytest.mark.parametrize("builder,emb", [(tiny_qwen3, "model.embed_tokens.weight"), (tiny_gpt2, "transformer.wte.weight")])
def test_tied_head_equal_to_the_embedding_is_dropped_and_logged(tmp_path, caplog, builder, emb):
    base = builder(tmp_path, tied=True, dtype=torch.bfloat16)
    assert "lm_head.weight" not in LazyCheckpoint(base)
    plain = low_rank_experts(base, tmp_path / "plain", 2, seed=4)
    tied = []
    for p in plain:
        q = p.with_name(p.stem + "-tied.safetensors")
        write_safetensors_file(q, _with_head(load_all(p), emb))
        tied.append(q)
    ws = _workspace(tmp_path, base)
    with caplog.at_level(logging.INFO, logger="mergewatch.checkpoint.validate"):
        _, report = ws.validate(tied[0])
    assert report.dropped == {"lm_head.weight": emb}
    assert f"tied duplicate 'lm_head.weight' dropped from {tied[0]}: equal to '{emb}'" in caplog.text
    # the same merged content as without the duplicate: the content id ignores it
    assert report.content_sha256 == ws.validate(plain[0])[1].content_sha256
    assert ws.merge(tied[0]).status == "merged"
    assert ws.merge(plain[0]).status == "duplicate"
    assert ws.merge(tied[1]).status == "merged"
    d = ws.root / "deploy" / "current"
    assert "lm_head.weight" not in LazyCheckpoint(d)
    model = load_and_run(d)
    torch.testing.assert_close(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    assert all(p.is_file() for p in tied)  # the user's files stay


def test_tied_head_that_differs_is_refused_with_the_reason(tmp_path):
    base = tiny_qwen3(tmp_path, tied=True)
    e = low_rank_experts(base, tmp_path / "e", 1)[0]
    bad = tmp_path / "untied.safetensors"
    write_safetensors_file(bad, _with_head(load_all(e), "model.embed_tokens.weight", delta=0.01))
    ws = _workspace(tmp_path, base)
    with pytest.raises(IncompatibleExpertError) as err:
        ws.merge(bad)
    text = str(err.value)
    assert "'lm_head.weight' is not in the base (tied to 'model.embed_tokens.weight'" in text
    assert "trained with untied embeddings" in text and "max |difference| 0.01" in text
    assert bad.is_file() and ws.merged_ids() == []
    # a head whose shape is not the embedding's is simply an unexpected tensor
    odd = tmp_path / "odd.safetensors"
    write_safetensors_file(odd, {**load_all(e), "lm_head.weight": torch.zeros(3, 32)})
    with pytest.raises(IncompatibleExpertError, match="unexpected tensor 'lm_head.weight'"):
        ws.merge(odd)


def test_untied_base_keeps_its_head(tmp_path):
    """With an untied base the head is an ordinary tensor: merged, published, never dropped."""
    base = tiny_qwen3(tmp_path, tied=False)
    assert "lm_head.weight" in LazyCheckpoint(base)
    ws = _workspace(tmp_path, base, 'init = "ft"\ndeploy = "ft"')  # deploy = the newest expert
    e = low_rank_experts(base, tmp_path / "e", 1)[0]
    assert ws.validate(e)[1].dropped == {}
    ws.merge(e)
    got = LazyCheckpoint(ws.root / "deploy" / "current")["lm_head.weight"]
    assert torch.equal(got, load_all(e)["lm_head.weight"])
