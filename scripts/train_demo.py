"""Train the demo LLaVA model that ships in ``attnkit/assets/demo/model`` (2 CPU cores: about 35 minutes).

Stage A trains the CLIP vision tower contrastively: its pooled [CLS] embedding against learned
caption embeddings (InfoNCE over the batch, CLIP-style) plus a sigmoid loss against learned
category embeddings (SigLIP-style), so [CLS] has to gather the objects from the patches. A dense
loss classifies each patch of the feature layer (-2) into the category covering most of it or
background (region-level supervision); it makes the patches the LLM sees informative within the
CPU budget. Stage B trains projector + language model (vision tower at a low learning rate) on
multi-turn conversations: an optional caption turn and balanced yes/no turns (each category asked
once, so no answer can be copied from an earlier turn) whose negatives are random, popular or
co-occurring categories. Two auxiliary losses make the yes/no grounding switch on reliably (answers
grounded at the first check, step 500 or 700, in both CPU runs with them; without them it came late
or never, benchmarks/RESULTS.md): an alignment loss, as in LLaVA's projector pre-training, makes
each projected object patch predict its category's word through the LM's input embeddings,
``CE(P(v_i) E^T, w(c_i))``; a probe loss makes the LM head at the asked object's word already
predict the answer, ``CE(logits[pos(X)], yes/no)``, so "the word finds its patches" is rewarded
before "the answer reads the word" exists. Data are drawn from the seed's world by index, so a run
is reproducible and resumes from its last checkpoint (``--b-steps`` equal to the checkpoint's
step just saves it). ``--device cuda`` runs the same recipe on a GPU (≈ 2.5 min; other weights).

    python scripts/train_demo.py --out attnkit/assets/demo/model --work runs/demo_train
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.synth.model import DemoModelConfig, build_config, build_processor, prompt
from attnkit.synth.text import CAPTION_PROMPTS, caption, question_answers
from attnkit.synth.world import CATEGORIES, SCENE_TYPES, SynthWorld, WorldConfig, world_stats

CAT_INDEX = {c.name: i for i, c in enumerate(CATEGORIES)}
KIND_INDEX = {k: i for i, k in enumerate(SCENE_TYPES)}


@dataclass
class TrainConfig:
    seed: int = 0
    a_steps: int = 300
    a_batch: int = 48
    a_lr: float = 2e-3
    b_steps: int = 1300
    b_batch: int = 16
    b_lr: float = 1e-3
    b_vision_lr: float = 2e-4     # 0 freezes the vision tower in stage B
    qa_turns: int = 8
    suffix_prob: float = 0.25
    random_negatives: float = 0.6   # from step b_prior_from on; the rest split between popular and co-occurring
    b_prior_from: int = 200         # before it, negatives are a third each (balanced per category: no prior)
    caption_prob: float = 0.7
    caption_mode: str = "random"    # "random": anywhere; "last": after the questions; "separate": own conversation
    align_weight: float = 1.0       # stage B: projected patches predict their category's word (0: off)
    probe_weight: float = 1.0       # stage B: the question's object word already predicts the answer (0: off)
    threads: int = 2
    device: str = "cpu"             # "cuda" on a lent GPU: the same recipe, not bit-identical weights
    ckpt_every: int = 50

    def __post_init__(self):
        if self.caption_mode not in ("random", "last", "separate"):
            raise ValueError(f"caption_mode={self.caption_mode!r}; allowed: 'random', 'last', 'separate'")


def pixels(images, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What ``CLIPImageProcessorPil`` gives for 96x96 inputs (checked against it at start-up)."""
    arr = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    return (arr - mean) / std


class CaptionEncoder(nn.Module):
    """The "text tower" of stage A: learned category and scene embeddings -> caption embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.cats = nn.Parameter(torch.randn(len(CATEGORIES), dim) * 0.1)
        self.kinds = nn.Parameter(torch.randn(len(SCENE_TYPES), dim) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, multi_hot: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        bag = multi_hot @ self.cats / multi_hot.sum(-1, keepdim=True) + self.kinds[kind]
        return F.normalize(self.mlp(bag), dim=-1)


def patch_targets(scenes, grid: int, patch: int, min_cover: float = 0.3) -> torch.Tensor:
    """(batch, grid*grid) class of each patch: 1 + the category covering most of it (>= ``min_cover``), else 0."""
    cover = torch.zeros(len(scenes), grid, grid, len(CATEGORIES))
    edges = np.arange(grid) * patch
    for i, s in enumerate(scenes):
        for o in s.objects:
            x, y, w, h = o.bbox
            ox = np.clip(np.minimum(edges + patch, x + w) - np.maximum(edges, x), 0, None)
            oy = np.clip(np.minimum(edges + patch, y + h) - np.maximum(edges, y), 0, None)
            k = CAT_INDEX[o.category]
            share = torch.from_numpy(np.outer(oy, ox) / patch**2).float()
            cover[i, :, :, k] = torch.maximum(cover[i, :, :, k], share)
    best, cat = cover.flatten(1, 2).max(-1)
    return torch.where(best >= min_cover, cat + 1, torch.zeros_like(cat))


def cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def stage_a(model, world: SynthWorld, cfg: TrainConfig, work: Path, mean, std) -> None:
    path = work / "stage_a.pt"
    tower = model.model.vision_tower
    if path.exists():
        tower.load_state_dict(torch.load(path, map_location=cfg.device))
        print(f"[A] loaded {path}", flush=True)
        return
    dim = tower.config.hidden_size
    dev = cfg.device
    text = CaptionEncoder(dim).to(dev)
    head, patch_head = nn.Linear(dim, dim).to(dev), nn.Linear(dim, len(CATEGORIES) + 1).to(dev)
    scale = nn.Parameter(torch.tensor(math.log(10.0), device=dev))
    bias = nn.Parameter(torch.tensor(-2.0, device=dev))
    params = [*tower.parameters(), *text.parameters(), *head.parameters(), *patch_head.parameters(), scale, bias]
    grid, patch = tower.config.image_size // tower.config.patch_size, tower.config.patch_size
    opt = torch.optim.AdamW(params, lr=cfg.a_lr, weight_decay=0.05)
    tower.train()
    t0 = time.time()
    for step in range(cfg.a_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.a_lr * cosine_lr(step, cfg.a_steps)
        scenes = [world.scene(step * cfg.a_batch + i) for i in range(cfg.a_batch)]
        x = pixels([world.render(s) for s in scenes], mean, std).to(dev)
        multi_hot = torch.zeros(len(scenes), len(CATEGORIES))
        for i, s in enumerate(scenes):
            multi_hot[i, [CAT_INDEX[c] for c in s.categories]] = 1
        multi_hot = multi_hot.to(dev)
        kind = torch.tensor([KIND_INDEX[s.kind] for s in scenes], device=dev)
        out = tower(pixel_values=x, output_hidden_states=True)
        img = F.normalize(head(out.pooler_output), dim=-1)
        cats = F.normalize(text.cats, dim=-1)
        txt = text(multi_hot, kind)
        logits = img @ txt.T * scale.exp()
        target = torch.arange(len(scenes), device=dev)
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        cat_logits = img @ cats.T * scale.exp() + bias
        sig = F.binary_cross_entropy_with_logits(cat_logits, multi_hot)
        dense = F.cross_entropy(patch_head(out.hidden_states[-2][:, 1:]).flatten(0, 1),
                                patch_targets(scenes, grid, patch).flatten().to(dev))
        loss = nce + sig + dense
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == cfg.a_steps - 1:
            acc = ((cat_logits > 0).float() == multi_hot).all(-1).float().mean()
            print(f"[A] step {step}/{cfg.a_steps} nce {nce.item():.3f} sig {sig.item():.3f} dense {dense.item():.3f} "
                  f"exact-set {acc.item():.2f} {time.time() - t0:.0f}s", flush=True)
    torch.save(tower.state_dict(), path)


class Conversations:
    """Token ids and labels of multi-turn training conversations, built like the chat template."""

    def __init__(self, processor, world: SynthWorld, cfg: TrainConfig):
        self.tok, self.world, self.cfg = processor.tokenizer, world, cfg
        self.n_image = processor.num_image_tokens if hasattr(processor, "num_image_tokens") else 144
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.a_id = self.tok.convert_tokens_to_ids("a")
        stats = world_stats([world.scene(10_000_000 + i) for i in range(3000)])
        self.stats = stats
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def sample(self, index: int, step: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Token ids, labels, and (position of the asked object's word, answer id) of each yes/no turn."""
        rng = np.random.default_rng([self.cfg.seed, index, 7])
        r = self.cfg.random_negatives if step >= self.cfg.b_prior_from else 1 / 3
        scene = self.world.scene(index)
        turns = question_answers(scene, rng, self.stats.cooccur, self.stats.frequency, n=self.cfg.qa_turns,
                                 suffix_prob=self.cfg.suffix_prob,
                                 negative_mix=(r, (1 - r) / 2, (1 - r) / 2))
        turns = [turns[t] for t in rng.permutation(len(turns))]
        cap = (CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))], caption(scene))
        mode = self.cfg.caption_mode
        if mode == "separate":
            turns = [cap] if rng.random() < self.cfg.caption_prob else turns
        elif rng.random() < self.cfg.caption_prob:
            turns.insert(rng.integers(len(turns) + 1) if mode == "random" else len(turns), cap)
        ids = [self.tok.bos_token_id] + self.ids("USER:") + [self.image_id] * 144
        labels, probes = [-100] * len(ids), []
        for k, (q, a) in enumerate(turns):
            p = self.ids(("" if k == 0 else "USER: ") + q + " ASSISTANT:")
            ans = self.ids(a) + [self.tok.eos_token_id]
            if a in ("yes", "no"):  # "... is there a X": X follows the first "a"
                probes.append((len(ids) + p.index(self.a_id) + 1, ans[0]))
            ids += p + ans
            labels += [-100] * len(p) + ans
        return ids, labels, probes


def stage_b(model, processor, world: SynthWorld, cfg: TrainConfig, work: Path, mean, std) -> None:
    conv = Conversations(processor, world, cfg)
    tower = model.model.vision_tower
    tower.requires_grad_(cfg.b_vision_lr > 0)
    vision_ids = {id(p) for p in tower.parameters()}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": rest, "base": cfg.b_lr}]
    if cfg.b_vision_lr > 0:
        groups.append({"params": list(tower.parameters()), "base": cfg.b_vision_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.b_lr, weight_decay=0.0)
    ckpt, start = work / "stage_b.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=cfg.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"[B] resumed at step {start}", flush=True)
    model.train()
    tower.train(cfg.b_vision_lr > 0)
    projected: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda mod, args, out: projected.append(out))
    word = torch.tensor([-100] + processor.tokenizer.convert_tokens_to_ids([c.name for c in CATEGORIES]))
    grid, patch = tower.config.image_size // tower.config.patch_size, tower.config.patch_size
    t0, recent = time.time(), []
    offset = 1_000_000  # scene indices disjoint from stage A's
    for step in range(start, cfg.b_steps):
        for g in opt.param_groups:
            g["lr"] = g["base"] * cosine_lr(step, cfg.b_steps)
        idx = [offset + step * cfg.b_batch + i for i in range(cfg.b_batch)]
        samples = [conv.sample(i, step) for i in idx]
        n = max(len(s[0]) for s in samples)
        input_ids = torch.tensor([s[0] + [0] * (n - len(s[0])) for s in samples])
        labels = torch.tensor([s[1] + [-100] * (n - len(s[1])) for s in samples])
        mask = torch.tensor([[1] * len(s[0]) + [0] * (n - len(s[0])) for s in samples])
        scenes = [world.scene(i) for i in idx]
        x = pixels([world.render(s) for s in scenes], mean, std)
        batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": x, "labels": labels}
        projected.clear()
        out = model(**{k: v.to(cfg.device) for k, v in batch.items()})
        loss = out.loss
        probes = [(b, pos, a) for b, s in enumerate(samples) for pos, a in s[2]]
        if cfg.probe_weight > 0 and probes:
            rows, cols, answers = zip(*probes, strict=True)
            probe = F.cross_entropy(out.logits[list(rows), list(cols)], torch.tensor(answers, device=cfg.device))
            loss = loss + cfg.probe_weight * probe
        if cfg.align_weight > 0:
            target = word[patch_targets(scenes, grid, patch)].to(cfg.device)
            logits = projected[0] @ model.get_input_embeddings().weight.T
            loss = loss + cfg.align_weight * F.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = [*recent[-19:], loss.item()]
        if step % 20 == 0 or step == cfg.b_steps - 1:
            print(f"[B] step {step}/{cfg.b_steps} loss {np.mean(recent):.4f} len {n} {time.time() - t0:.0f}s",
                  flush=True)
        if (step + 1) % cfg.ckpt_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    hook.remove()


@torch.no_grad()
def quick_check(model, processor, n: int = 60) -> None:
    """POPE-style accuracy on held-out scenes (seed 1), random negatives; and one caption."""
    model.eval()
    world = SynthWorld(WorldConfig(seed=1))
    rng = np.random.default_rng(0)
    correct = 0
    for i in range(n):
        s = world.scene(i)
        yes = i % 2 == 0
        pool = s.categories if yes else [c.name for c in CATEGORIES if c.name not in s.categories]
        obj = pool[rng.integers(len(pool))]
        inp = processor(images=[world.render(s)], text=[prompt(processor, f"Is there a {obj} in the image?")],
                        return_tensors="pt").to(model.device)
        out = model.generate(**inp, max_new_tokens=2, do_sample=False)
        ans = processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        correct += ans.startswith("yes") == yes
    s = world.scene(0)
    inp = processor(images=[world.render(s)], text=[prompt(processor, CAPTION_PROMPTS[0])], return_tensors="pt")
    inp = inp.to(model.device)
    out = model.generate(**inp, max_new_tokens=30, do_sample=False)
    print(f"[check] yes/no acc {correct / n:.3f}; caption: "
          f"{processor.tokenizer.decode(out[0, inp['input_ids'].shape[1]:], skip_special_tokens=True)!r} "
          f"(truth {caption(s)!r})", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attnkit/assets/demo/model")
    ap.add_argument("--work", default="runs/demo_train")
    for k, v in vars(TrainConfig()).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in vars(TrainConfig())})
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from transformers import LlavaForConditionalGeneration

    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config(DemoModelConfig()))
    world = SynthWorld(WorldConfig(seed=cfg.seed))
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    im = world.render(world.scene(0))
    ref = processor(images=[im], text=[prompt(processor, "x")], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels([im], mean, std), ref, atol=1e-5), "pixel pipeline differs from the processor"

    model.to(cfg.device)
    t0 = time.time()
    stage_a(model, world, cfg, work, mean, std)
    print(f"[A] done {time.time() - t0:.0f}s", flush=True)
    stage_b(model, processor, world, cfg, work, mean, std)
    print(f"[B] done {time.time() - t0:.0f}s", flush=True)
    quick_check(model, processor)
    model.to("cpu")
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
