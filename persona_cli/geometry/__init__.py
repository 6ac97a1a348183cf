"""Persona geometry: where each persona sits in the model's activation space.

- `hidden`: batched hidden states at chosen layers (left-padded, length-sorted), for the two
  centroid methods: `prompt-last` (the last prompt token, after the assistant header) and
  `response-mean` (the mean over an answer's tokens).
- `vectors`: the safetensors files of centroids and per-question vectors, with their metadata.
- `extract`: `persona-vectors extract`, one run directory of centroids per persona.
- `similarity`: cosine matrices (raw, centred, reference-subtracted) with bootstrap intervals
  over questions.
- `leakage`: the join of a similarity run with an eval-markers run (cosine to the source vs
  marker rate per bystander).
- `shift`: two extract runs of the same personas and questions (base vs an adapter stack):
  per-persona centroid shift and the change in mean off-diagonal cosine, paired bootstrap.
- `trait`: trait vectors (positive minus negative persona centroid per layer, optionally from
  the judged pairs only, `judged`) and the projection of an eval-markers run's completions on
  them.
- `judged`: which (positive, negative) answer pairs a judge-align run passes
  (`trait --filter-by`).
- `steer`: forward hooks that add a vector to the residual stream or project it out;
  `eval-markers --steer / --ablate` applies them around generation (hf backend), recorded as
  guarded protocol fields.
- `plots`: the heatmap, scatter and shift-bar PNGs.

The library never prints and never imports typer or rich; `persona_cli.cli.geometry` is the
command layer.
"""
