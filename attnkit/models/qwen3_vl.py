"""Qwen3-VL (``Qwen3VLForConditionalGeneration``)."""

from __future__ import annotations

import torch

from attnkit.models.qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen2-VL's layout (no-[CLS] ViT, 2x2 merger, ``<|vision_start|> <|image_pad|> * (t*h*w/4) <|vision_end|>``
    per image, counts from ``image_grid_thw``) with interleaved 3-D mrope and DeepStack.

    DeepStack: the outputs of the vision blocks ``deepstack_visual_indexes`` go through their own mergers and
    are added to the LLM's hidden states at the visual positions after decoder layers 0 ... n-1
    (``Qwen3VLTextModel._deepstack_process``, in the text model's loop, outside the layers). Without
    token dropping this needs nothing: every intervention sees the hidden states, masks and positions the
    model makes.

    Token dropping (:meth:`install_token_dropping`): each level's rows follow the kept tokens. The model's
    ``visual_pos_masks`` / ``deepstack_visual_embeds`` (one row per visual token, prompt order) are read at the
    language model's input and spread over prompt positions; the add after decoder layer i uses the layout that
    layer i runs on (``state.plan_at(i)``): only the kept visual tokens get a row, their own. A drop at layer K
    acts on the residual stream ENTERING layer K, i.e. after level K-1 was added (:meth:`layer_output`), so a
    stage's decision and its merged rows see what layer K would see. A merged token (VisionZip at layer 0,
    SparseVLM's recycled tokens at K) gets, for each level not yet added, the same weighted combination of its
    members' DeepStack rows as its own row (``Selection.weights``: VisionZip ``row_t + mean_{j→t} row_j``,
    SparseVLM the cluster mean). VisionZip merges the merger's INPUT units then projects them (as on
    Qwen2-VL); its DeepStack rows are combined after their mergers (a DeepStack merger is not linear, and its
    inputs are not captured): the one place where main and DeepStack rows are merged at different stages.

    Vision score: Qwen3-VL's ViT has no [CLS]; ``received`` (the mean attention each patch receives at the
    last block, whose output feeds the merger, pooled over the 2x2 merge unit) is the substitute, as for
    Qwen2-VL (VisPruner issue #1). The DeepStack levels do not enter the score.
    """

    families = {"Qwen3VLForConditionalGeneration": "qwen3_vl"}

    @property
    def deepstack_layers(self) -> list[int]:
        """Decoder layers after which DeepStack features are added (one per vision feature level)."""
        return list(range(len(self.model.config.vision_config.deepstack_visual_indexes)))

    # --- token dropping ----------------------------------------------------------------------------------
    def install_token_dropping(self, ctx) -> None:
        """Make the DeepStack adds follow the token dropper's plans (see the class docstring)."""
        lm, state = self.language_model, ctx.state
        original = lm._deepstack_process
        table: dict = {}

        def read_inputs(module, args, kwargs):
            table.clear()
            embeds, mask, inputs = (kwargs.get(k) for k in ("deepstack_visual_embeds", "visual_pos_masks",
                                                              "inputs_embeds"))
            if state.step != 0 or state.spans is None or embeds is None or mask is None or inputs is None \
                    or mask.shape[1] != state.spans.length:
                return
            mask = mask.to(inputs.device).bool()
            dense = []
            for rows in embeds:
                d = rows.new_zeros(*mask.shape, rows.shape[-1], device=inputs.device)
                d[mask] = rows.to(inputs.device)
                dense.append(d)
            table.update(mask=mask, dense=dense, done=set(), calls=0)

        def add(level: int, hidden: torch.Tensor) -> torch.Tensor:
            plan = state.plan_at(level)
            mask, rows = table["mask"], self._merged_rows(table["dense"], level, state.keep_plans)
            if plan is not None:
                mask = _gather(mask, plan.index) & plan.slot_valid.to(mask.device)
                rows = _gather(rows, plan.index)
            if hidden.shape[1] != mask.shape[1]:
                raise RuntimeError(f"DeepStack level {level}: the hidden states hold {hidden.shape[1]} tokens but the "
                                   f"token dropper's layout for decoder layer {level} holds {mask.shape[1]}")
            table["done"].add(level)
            return original(hidden, mask, rows[mask])

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            if not table:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            level, table["calls"] = table["calls"], table["calls"] + 1
            return hidden_states if level in table["done"] else add(level, hidden_states)

        def layer_output(layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
            if not table or layer_idx >= len(table["dense"]) or layer_idx in table["done"]:
                return hidden
            return add(layer_idx, hidden)

        ctx.installed.forward_pre_hook(lm, read_inputs, with_kwargs=True)
        ctx.installed.set_attr(lm, "_deepstack_process", deepstack_process)
        ctx.installed.set_attr(self, "_layer_output", layer_output)

    def layer_output(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream after decoder layer ``layer_idx`` as layer ``layer_idx + 1`` receives it: DeepStack
        level ``layer_idx`` added (in the current layout; the model's own add of that level is then skipped)."""
        fn = self.__dict__.get("_layer_output")
        return hidden if fn is None else fn(layer_idx, hidden)

    @staticmethod
    def _merged_rows(dense: list[torch.Tensor], level: int, plans: list) -> torch.Tensor:
        """Level ``level``'s rows over prompt positions [B, L, D], with the merged tokens of every plan in force for
        decoder layer ``level`` combined from their members (``KeepPlan.sources``)."""
        rows = dense[level]
        for plan in plans:
            if plan.from_layer > level:
                break
            for b, blocks in enumerate(getattr(plan, "sources", None) or []):
                for merged, members, weights in blocks or ():
                    if not len(merged):
                        continue
                    rows = rows.clone() if rows is dense[level] else rows
                    src = rows[b, members.to(rows.device)].float()
                    rows[b, merged.to(rows.device)] = (weights.to(src) @ src).to(rows.dtype)
        return rows


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, L, ...] at ``index`` [B, Lk] along dim 1."""
    idx = index.to(x.device)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]
