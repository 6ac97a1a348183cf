"""The train-grpo trainer: GRPO (+ SDPO) with the projected update, mixed-policy generation, the
DPO channel, and the probe adapter (LoRA or SVD delta) as the trained parameters.

`RLTrainer` is `persona_cli.train.sdpo.SelfDistillGRPOTrainer` with:

- the policy's adapter built by `persona_cli.probe.adapters.build_adapter` (`ProbeAdapter`), so
  v_hack's layout is the adapter's; an svd adapter is saved (checkpoints and the final adapter)
  as `save_svd_adapter` writes it and resumed with `load_svd_state`;
- `--vhack`: a `persona_cli.train.projection.ProjectionCallback` projects each update; its
  record joins the step's log entry (`proj_*`, and the per-module `projection`);
- `--generator`: `_generate_single_turn` lets each generator write its slots of every group
  (`persona_cli.train.mixed`); `_annotate` sets the PPO "old" log-probabilities of those rows to
  the generator's and logs the importance-ratio statistics (`mix/*`);
- `--dpo-pairs`: the DPO term (`persona_cli.train.channels`) added to every micro-batch's loss
  at `--dpo-weight`, logged as `dpo/loss`, its pairs as `dpo_pairs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from persona_cli.probe.adapters import ProbeAdapter, load_svd_state, save_svd_adapter
from persona_cli.train.channels import DpoChannel
from persona_cli.train.mixed import POLICY, Generator, ratio_stats, token_logprobs
from persona_cli.train.projection import ProjectionCallback
from persona_cli.train.sdpo import SelfDistillGRPOTrainer


class RLTrainer(SelfDistillGRPOTrainer):
    def __init__(
        self,
        *args: Any,
        adapter: ProbeAdapter,
        projection: ProjectionCallback | None = None,
        generators: list[Generator] | None = None,
        slots: list[int | None] | None = None,
        dpo: DpoChannel | None = None,
        dpo_weight: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        self.projection = projection
        self.generators = generators or []
        self.slots = slots or [None] * self.num_generations
        self.dpo = dpo
        self.dpo_weight = dpo_weight
        self._owners: list[int | None] = []
        self._dpo_pairs: list[int] = []
        self._micro = 0
        self._micro_step = -1
        if projection is not None:
            self.add_callback(projection)
        if dpo is not None:
            dpo.prepare_reference(self.model)  # the start policy: the adapter has no effect yet

    # ------------------------------------------------------------------ mixed-policy generation

    def _generate_single_turn(
        self,
        prompt_ids: list[list[int]],
        images: Any,
        multimodal_fields: Any,
        num_generations: int,
        has_tool_images: bool = False,
    ) -> tuple[list[list[int]], Any]:
        if not self.generators or not self.model.training:
            self._owners = [None] * len(prompt_ids)
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        offset = self.accelerator.process_index * len(prompt_ids)
        owners = [self.slots[(offset + i) % num_generations] for i in range(len(prompt_ids))]
        completions: list[list[int] | None] = [None] * len(prompt_ids)
        mine = [i for i, o in enumerate(owners) if o is None]
        ids, _ = super()._generate_single_turn(
            [prompt_ids[i] for i in mine], images, multimodal_fields, num_generations
        )
        for i, c in zip(mine, ids, strict=True):
            completions[i] = c
        for j, generator in enumerate(self.generators):
            theirs = [i for i, o in enumerate(owners) if o == j]
            if not theirs:
                continue
            got = generator.generate(
                [prompt_ids[i] for i in theirs],
                self.generation_config,
                self._tokenizer.pad_token_id,
                self.eos_token_ids,
            )
            for i, c in zip(theirs, got, strict=True):
                completions[i] = c
        self._owners = owners
        return completions, None  # type: ignore[return-value]

    def _annotate(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        ids = output["completion_ids"]
        mask = output["completion_mask"]
        extras: list[dict[str, Any]] = [
            {
                "generator": POLICY if o is None else self.generators[o].spec.label,
                "completion_ids": row[m.bool()].tolist(),
            }
            for o, row, m in zip(self._owners, ids.cpu(), mask.cpu(), strict=True)
        ]
        if self.generators and self.model.training:
            self._off_policy(output, extras)
        self.row_extras = extras

    def _off_policy(self, output: dict[str, Any], extras: list[dict[str, Any]]) -> None:
        """The generators' rows get their behaviour log-probs as the PPO old log-probs."""
        full = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        n = output["completion_ids"].size(1)
        with torch.no_grad():
            policy, _, _ = self._get_per_token_logps_and_entropies(
                self.model, full, attention, n, batch_size=self.args.per_device_train_batch_size
            )
        old = output.get("old_per_token_logps")
        old = policy.clone() if old is None else old.clone()
        behaviour = torch.zeros_like(policy)
        rows = torch.zeros(policy.size(0), dtype=torch.bool, device=policy.device)
        for j, generator in enumerate(self.generators):
            theirs = [i for i, o in enumerate(self._owners) if o == j]
            if not theirs:
                continue
            lp = token_logprobs(
                generator.model, full[theirs], attention[theirs], n, self.temperature
            ).to(policy.device)
            behaviour[theirs] = lp
            old[theirs] = lp
            rows[theirs] = True
        output["old_per_token_logps"] = old
        mask = output["completion_mask"].bool() & rows[:, None]
        stats = ratio_stats(policy, behaviour, mask, self.epsilon_low)
        metrics = self._metrics["train"]
        for key in ("ratio_mean", "ratio_min", "ratio_max", "ratio_clip_frac"):
            if key in stats:
                metrics[f"mix/{key}"].append(stats[key])
        for k, frac in enumerate(stats.get("ratio_hist", [])):
            metrics[f"mix/ratio_hist_{k:02d}"].append(frac)
        metrics["mix/ratio_tokens"].append(float(stats["ratio_tokens"]))
        cmask = output["completion_mask"].bool().cpu()
        for i, extra in enumerate(extras):
            m = cmask[i]
            extra["policy_logprobs"] = policy[i].cpu()[m].tolist()
            if rows[i]:
                extra["behaviour_logprobs"] = behaviour[i].cpu()[m].tolist()

    # ------------------------------------------------------------------ the DPO channel

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.dpo is None or not self.model.training:
            return loss
        accumulation = self.current_gradient_accumulation_steps
        if self._micro_step != self.state.global_step:
            self._micro_step, self._micro = self.state.global_step, 0
        k = self.state.global_step * accumulation + self._micro
        self._micro += 1
        term, idx = self.dpo.term(model, k)
        self._dpo_pairs.extend(idx)
        self._metrics["train"]["dpo/loss"].append(
            self.accelerator.gather(term.detach()).mean().item()
        )
        return loss + self.dpo_weight * term / accumulation

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, Any], start_time: float | None = None) -> None:
        if "loss" in logs and self.model.training:
            if self.projection is not None and self.projection.last is not None:
                logs.update(self.projection.last)
                self.projection.last = None
            if self.dpo is not None:
                logs["dpo_pairs"] = self._dpo_pairs
                self._dpo_pairs = []
        super().log(logs, start_time)

    # ------------------------------------------------------------------ svd adapters

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        if self.adapter.config.kind != "svd":
            return super()._save(output_dir, state_dict)
        directory = Path(output_dir or self.args.output_dir)
        save_svd_adapter(directory, self.adapter)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self.adapter.config.kind != "svd":
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_svd_state(Path(resume_from_checkpoint), self.adapter)
        return None
