"""The ``lmms`` subclass that lmms-eval 0.7.3 loads for ``--model attnkit`` (imports lmms-eval; see lmms_eval.py)."""

from __future__ import annotations

import os

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from attnkit.integrations.lmms_eval import AttnkitGenerator, batch_size_of, generator_kwargs


class AttnkitLMMS(lmms):
    """Chat model: ``generate_until`` through :class:`AttnkitGenerator` (interventions installed at load)."""

    is_simple = False

    def __init__(self, pretrained: str, batch_size: int | str = 1, **kwargs):
        super().__init__()
        self.batch_size_per_gpu = batch_size_of(batch_size)
        self._init_distributed()
        kw = generator_kwargs({"pretrained": pretrained, **kwargs})
        if self._world_size > 1 and "device_map" not in kw and "device" not in kw:
            kw["device_map"] = f"cuda:{self._rank}"
        self.generator = AttnkitGenerator(**kw)

    def _init_distributed(self) -> None:
        """Under ``accelerate launch`` the evaluator shards requests by rank and gathers with ``accelerator``."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes

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
