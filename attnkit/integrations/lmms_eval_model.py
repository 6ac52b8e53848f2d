"""The ``lmms`` subclass that lmms-eval 0.7.3 loads for ``--model attnkit`` (imports lmms-eval; see lmms_eval.py)."""

from __future__ import annotations

import os

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from attnkit.integrations.lmms_eval import AttnkitGenerator, batch_size_of, generator_kwargs


class AttnkitLMMS(lmms):
    """Chat model: ``generate_until`` through :class:`AttnkitGenerator` (interventions installed at load), in
    batches of ``--batch_size`` (grouped and sorted by prompt length as lmms-eval's ``Collator`` does).

    Several processes (``torchrun --nproc_per_node N -m lmms_eval ...`` or ``accelerate launch``): lmms-eval gives
    each rank its shard of the requests; each process loads the model on ``cuda:{LOCAL_RANK}`` (on the CPU
    without CUDA) and writes its own ``….rank{r}.jsonl``.
    """

    is_simple = False

    def __init__(self, pretrained: str, batch_size: int | str = 1, max_batch_size: int | str | None = None,
                 **kwargs):
        super().__init__()
        self._init_distributed()
        size = batch_size_of(batch_size)          # None: auto, sized by the generator (at most max_batch_size)
        kw = generator_kwargs({"pretrained": pretrained, **kwargs})
        if self._world_size > 1 and "device_map" not in kw and "device" not in kw and torch.cuda.is_available():
            kw["device_map"] = f"cuda:{int(os.environ.get('LOCAL_RANK', self._rank))}"
        self.generator = AttnkitGenerator(**kw, rank=self._rank, world_size=self._world_size, batch_size=size,
                                          max_batch_size=None if max_batch_size is None else int(max_batch_size))
        self.batch_size_per_gpu = self.generator.batch_size

    def _init_distributed(self) -> None:
        """Rank and world size from the launcher's environment (the evaluator shards requests by them)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            self._rank, self._world_size = int(os.environ.get("RANK", "0")), world

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go; lmms-eval puts its rank-gathering tensors here."""
        return self.generator.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests) -> list[GenerationResult]:
        results = self.generator.generate_until([r.args for r in requests], self.task_dict)
        return [GenerationResult(text=text, token_counts=TokenCounts(output_tokens=n)) for text, n in results]

    def loglikelihood(self, requests):
        raise NotImplementedError("attnkit's lmms-eval model supports generate_until tasks only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("attnkit's lmms-eval model supports generate_until tasks only")
