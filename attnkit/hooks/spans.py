"""VisualSpans: which sequence positions hold visual tokens, per sample.

Built once per ``generate()`` (at prefill) from ``input_ids``; every intervention reads the same
object in prefill and in each decode step. Positions are absolute indices into the prompt (left
padding included), so they stay valid for the KV cache columns during decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualSpans:
    """Per-sample visual-token positions of a (possibly left-padded) batch.

    ``visual[b, t]``   True where prompt position t of sample b is a visual token.
    ``image_id[b, t]`` index of the image (within sample b) that token belongs to, -1 elsewhere.
    ``valid[b, t]``    False on padding.
    """

    visual: torch.Tensor
    image_id: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_input_ids(cls, input_ids: torch.Tensor, image_token_id: int, attention_mask: torch.Tensor | None = None,
                       tokens_per_image: int | None = None) -> VisualSpans:
        """Find visual tokens as runs of ``image_token_id``.

        Each maximal run is one image; when ``tokens_per_image`` is known (LLaVA-1.5: a fixed count),
        a run of several back-to-back images is split into blocks of that size.
        """
        visual = input_ids == image_token_id
        valid = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        run_id = torch.cumsum(starts.long(), dim=1) - 1
        if tokens_per_image:
            offset_in_run = _offset_in_run(visual)
            # a run of n * tokens_per_image tokens holds n images; count earlier images of earlier runs
            run_len_blocks = _blocks_before(visual, run_id, tokens_per_image)
            image_id = run_len_blocks + offset_in_run // tokens_per_image
        else:
            image_id = run_id
        image_id = torch.where(visual, image_id, torch.full_like(image_id, -1))
        return cls(visual=visual, image_id=image_id, valid=valid)

    @property
    def batch_size(self) -> int:
        return self.visual.shape[0]

    @property
    def length(self) -> int:
        return self.visual.shape[1]

    def counts(self) -> list[int]:
        """Visual tokens per sample."""
        return self.visual.sum(dim=1).tolist()

    def positions(self, b: int) -> torch.Tensor:
        """Sorted positions of the visual tokens of sample ``b``."""
        return self.visual[b].nonzero().squeeze(1)

    def images(self, b: int) -> list[torch.Tensor]:
        """Positions of each image's tokens in sample ``b``, in order."""
        ids = self.image_id[b]
        n = int(ids.max().item()) + 1 if self.visual[b].any() else 0
        return [(ids == i).nonzero().squeeze(1) for i in range(n)]

    def text_after_image(self) -> torch.Tensor:
        """[B, L] True on valid non-visual tokens that come after the sample's first visual token."""
        seen = torch.cumsum(self.visual.long(), dim=1) > 0
        return seen & ~self.visual & self.valid

    def has_images(self) -> bool:
        return bool(self.visual.any())


def _offset_in_run(visual: torch.Tensor) -> torch.Tensor:
    """Index of each visual token within its run (0, 1, 2, ... restarting at each run)."""
    idx = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
    starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - last_start


def _blocks_before(visual: torch.Tensor, run_id: torch.Tensor, block: int) -> torch.Tensor:
    """For each token, how many fixed-size images lie in the runs before its run."""
    out = torch.zeros_like(run_id)
    for b in range(visual.shape[0]):
        runs = run_id[b][visual[b]]
        if runs.numel() == 0:
            continue
        lengths = torch.bincount(runs)
        blocks = torch.div(lengths + block - 1, block, rounding_mode="floor")
        before = torch.cumsum(blocks, 0) - blocks
        out[b] = torch.where(visual[b], before[run_id[b].clamp(min=0)], torch.zeros_like(run_id[b]))
    return out
