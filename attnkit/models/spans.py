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
                       image_token_counts: list[int] | None = None) -> VisualSpans:
        """Find visual tokens (``input_ids == image_token_id``) and the image each belongs to.

        ``image_token_counts`` (tokens of each image, in batch order, as the model fills them in:
        row-major over the batch) splits back-to-back images; without it each maximal run of visual
        tokens is taken as one image.
        """
        visual = input_ids == image_token_id
        valid = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
        if image_token_counts is not None and sum(image_token_counts) == int(visual.sum()):
            image_id = _ids_from_counts(visual, image_token_counts)
        else:
            starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
            image_id = torch.cumsum(starts.long(), dim=1) - 1
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


def _ids_from_counts(visual: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-sample image index of each visual token, given every image's token count in row-major order."""
    bounds = torch.tensor(counts, device=visual.device).cumsum(0)
    global_rank = torch.cumsum(visual.flatten().long(), 0).view_as(visual) - 1      # row-major visual index
    global_image = torch.searchsorted(bounds, global_rank.clamp(min=0), right=True)
    first = torch.where(visual, global_image, torch.full_like(global_image, 1 << 30)).min(dim=1, keepdim=True).values
    return global_image - first
