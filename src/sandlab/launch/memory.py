"""Per-GPU memory plan of a recipe's GPU jobs, checked before anything is queued or any weights load.

A training job (train, grpo) is the sum of:

* **model states**: DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs`` /
  ``estimate_zero2_model_states_mem_needs``: 18 bytes per parameter over the ZeRO group plus the
  largest layer gathered, or 2 bytes with the optimizer offloaded); without DeepSpeed, bf16 weights,
  gradients and AdamW moments (8 bytes per parameter, as TRL loads the model in bf16);
* **activations** of one micro-batch of ``per_device_train_batch_size x max_length /
  sequence_parallel_size`` tokens per GPU: with gradient checkpointing, every layer's input (hidden x
  2 bytes per token) plus one layer recomputed in full; without, every layer in full. A Qwen2/Llama
  layer saves 26h + 8·kv + 8·I bytes per token in bf16 (h hidden, kv = KV heads x head dim, I the MLP
  width), counted from the tensors autograd keeps (RMSNorm's fp32 copy, q/k/v, RoPE, attention
  output, gate/up/SiLU/product); Liger's fused RMSNorm/RoPE/SwiGLU keep 14h + 4·kv + 6·I;
* **the LM head**: TRL's fused, tiled log-prob head (4,096 tokens x 32,768 vocabulary tiles, fp32),
  so the ``tokens x vocabulary`` logits never exist; the full logits (12 bytes per element: bf16
  logits, fp32 log-softmax and its gradient) or Liger's fused linear cross-entropy for the benchmark;
* for GRPO, the reference model when ``beta > 0`` and the share of the GPU that colocated vLLM takes.

A vLLM job (teacher server or engine, evaluation, pass-rate student) holds its weights over the tensor
parallel group and a KV cache of 2 x layers x KV heads (per GPU) x head dim x dtype bytes per token in
what ``gpu_memory_utilization`` leaves; the plan reports how many sequences of ``max_model_len`` fit.

The score stage's reward model (transformers engine) holds its weights and one forward of its longest
batch: per token, dtype bytes x (2h + 3I + head dim) + 4h (an MLP's live tensors, RMSNorm's fp32 copy,
RoPE), no KV cache, plus the boolean mask of a padded batch; an in-process vLLM teacher of the same
job keeps its share of the GPU.

The budget is ``FIT_FRACTION`` of the GPU's memory (``cluster.gpu_memory_gb``, else the table by
``cluster.gpu_type``): the rest covers the CUDA context, NCCL buffers and allocator fragmentation.
When a job does not fit, the plan lists the cheapest changes that do, each with its estimate.

The model's shape comes from its HF config (a local path, or the local HF cache), else from the
recipe's ``architecture`` (HF config fields), else from ``num_params_b`` with a generic shape and a
warning. Parameters are counted on the meta device, so nothing is allocated.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sandlab.config import RecipeConfig
from sandlab.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2**30
# Usable memory per GPU, GiB (what torch reports as total: 80 GB HBM is 79.2 GiB), by the names
# cluster.gpu_type uses. Checked longest key first ("H100 NVL" before "H100").
GPU_MEMORY_GIB = {"H100 NVL": 93.1, "H100": 79.2, "H200": 139.8, "A100 80GB": 79.2, "A100 40GB": 39.4, "MI300X": 191.5, "MI325X": 255.5}
FIT_FRACTION = 0.90
# TRL's fused LM head (trl.kernels.chunked_logprob): fp32 tiles of this many tokens x vocabulary entries.
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768


def gpu_memory_gib(cluster) -> float | None:
    """The cluster's GPU memory in GiB; None for CPU-only clusters (nothing to check)."""
    if cluster.gpu_memory_gb:
        return float(cluster.gpu_memory_gb)
    if not cluster.gpus_per_node:
        return None
    if not cluster.gpu_type:
        raise ConfigError("the cluster has GPUs but no cluster.gpu_type; set cluster.gpu_type (e.g. 'H100 SXM') or cluster.gpu_memory_gb")
    name = cluster.gpu_type.upper().replace("-", "").replace(" ", "")  # "A100-SXM4-80GB", "A100 80 GB" alike
    if "A100" in name and not any(s in name for s in ("40", "80")):
        raise ConfigError(f"cluster.gpu_type={cluster.gpu_type!r} does not say 40 or 80 GB; set cluster.gpu_memory_gb")
    for key in sorted(GPU_MEMORY_GIB, key=len, reverse=True):
        if all(part in name for part in key.upper().split()):
            return GPU_MEMORY_GIB[key]
    known = ", ".join(GPU_MEMORY_GIB)
    raise ConfigError(f"cluster.gpu_type={cluster.gpu_type!r} is not in sandlab's GPU memory table ({known}); set cluster.gpu_memory_gb")


# ---- model shapes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    params: int
    largest_layer_params: int  # DeepSpeed's largest layer (gathered whole under ZeRO-3)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    source: str  # where the shape came from

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _shape_from_config(config, source: str, *, classifier: bool = False) -> ModelShape:
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: PLC0415

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):  # the real module tree, no memory
        if classifier:  # a reward model: a one-output score head instead of the LM head
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    sizes = [p.numel() for p in model.parameters()]  # shared (tied) parameters once
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    if getattr(text, "num_experts_per_tok", None) and getattr(text, "moe_intermediate_size", None):
        intermediate = text.moe_intermediate_size * text.num_experts_per_tok  # the MLP width a token passes through
    return ModelShape(sum(sizes), max(sizes), text.num_hidden_layers, text.hidden_size, heads, getattr(text, "num_key_value_heads", None) or heads,
                      head_dim, intermediate, text.vocab_size, source)


def _generic_shape(num_params_b: float) -> ModelShape:
    """A dense Qwen2.5-like shape for a parameter count (hidden/layers ~ 80, MLP 5.4 x hidden, 8 query
    heads per KV head, head dim 128): enough for activations to the right order of magnitude."""
    n = num_params_b * 1e9
    hidden = int(round((80 * n / 18.7) ** (1 / 3) / 128) * 128) or 128
    layers = max(1, round(hidden / 80))
    heads = max(1, hidden // 128)
    return ModelShape(int(n), 152064 * hidden, layers, hidden, heads, max(1, heads // 8), 128, int(5.4 * hidden), 152064,
                      f"num_params_b={num_params_b:g} with a generic shape")


def model_shape(path: str, architecture: dict[str, Any] | None, num_params_b: float | None, *, what: str, classifier: bool = False) -> ModelShape:
    """The shape of ``path`` (``classifier``: as a sequence-classification model): its HF config when it
    can be read offline, else ``architecture``, else ``num_params_b`` (warned). Raises ConfigError when
    none is there."""
    return _cached_shape(path, json.dumps(architecture, sort_keys=True) if architecture else None, num_params_b, what, classifier)


@functools.lru_cache(maxsize=32)  # building a large MoE on the meta device takes seconds
def _cached_shape(path: str, architecture_json: str | None, num_params_b: float | None, what: str, classifier: bool = False) -> ModelShape:
    from sandlab.launch.cost import _model_config  # noqa: PLC0415

    architecture = json.loads(architecture_json) if architecture_json else None

    config = _model_config(path)
    if config is not None:
        return _shape_from_config(config, "HF config", classifier=classifier)
    if architecture:
        from transformers import AutoConfig  # noqa: PLC0415

        fields = dict(architecture)
        try:
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{what}.architecture needs a model_type transformers knows: {exc}") from None
        return _shape_from_config(config, f"{what}.architecture", classifier=classifier)
    if num_params_b:
        log.warning("memory plan: the config of %s cannot be read here; estimating from %s.num_params_b=%g with a generic shape",
                    path, what, num_params_b)
        return _generic_shape(num_params_b)
    raise ConfigError(f"memory plan: the config of {path} cannot be read here; set {what}.architecture (HF config fields) or {what}.num_params_b")


# ---- training ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainLayout:
    """What a training job's memory depends on (one GPU's view)."""

    world: int  # processes (GPUs) in the job
    gpus_per_node: int
    micro_batch: int  # sequences per forward per GPU (before sequence parallelism splits them)
    seq_len: int  # tokens per sequence (max_length; padded batches pad to the longest row)
    accumulation: int
    global_batch: int
    zero_stage: int  # 0: no DeepSpeed (DDP)
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = True
    liger: bool = False
    sequence_parallel: int = 1
    lora_r: int = 0
    attn: str = "flash_attention_2"
    precision: str = "bf16"  # bf16: bf16 weights (TRL); amp: fp32 weights + bf16 autocast; fp32
    lm_head: str = "trl"  # trl: TRL's tiled log-prob head; full: full logits; liger: fused linear cross-entropy
    ref_model: bool = False  # GRPO with beta > 0
    reserved_fraction: float = 0.0  # colocated vLLM's share of the GPU (GRPO)

    @property
    def tokens_per_gpu(self) -> int:
        return math.ceil(self.micro_batch * self.seq_len / self.sequence_parallel)


@dataclass
class MemoryItem:
    name: str
    gib: float
    note: str = ""


@dataclass
class Suggestion:
    overrides: list[str]
    what: str
    total_gib: float
    step_time: str


@dataclass
class JobPlan:
    job: str
    what: str  # one line: model, layout
    items: list[MemoryItem]
    capacity_gib: float | None
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    budget_fraction: float = FIT_FRACTION
    sequences: int | None = None  # vLLM jobs: sequences of max_model_len the KV cache holds at once

    @property
    def total_gib(self) -> float:
        return sum(i.gib for i in self.items)

    @property
    def budget_gib(self) -> float | None:
        return None if self.capacity_gib is None else self.capacity_gib * self.budget_fraction

    @property
    def fits(self) -> bool:
        within = self.budget_gib is None or self.total_gib <= self.budget_gib * (1 + 1e-9)
        return within and (self.sequences is None or self.sequences >= 1)


def _layer_bytes_per_token(shape: ModelShape, *, precision: str, liger: bool) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    act = 4 if precision == "fp32" else 2  # matmul outputs (bf16 under autocast)
    if liger:  # fused RMSNorm (input + output), RoPE (no copies), SwiGLU (gate, up, output)
        norm = {"bf16": 4 * h, "amp": 10 * h, "fp32": 8 * h}[precision]
        attn = act * (3 * h + 2 * kv)
        mlp = act * 3 * inter
    else:  # RMSNorm's fp32 copy, normalised input and output; q/k/v, RoPE inputs and rotations; gate/up/SiLU/product
        norm = {"bf16": 8 * h, "amp": 14 * h, "fp32": 12 * h}[precision]
        attn = act * (5 * h + 4 * kv)
        mlp = act * 4 * inter
    return 2 * norm + attn + mlp


def _model_states(shape: ModelShape, lay: TrainLayout) -> list[MemoryItem]:
    n, nodes = shape.params, max(1, lay.world // max(lay.gpus_per_node, 1))
    per_node = lay.world // nodes
    if lay.lora_r:  # frozen base weights; the adapters' own states are negligible
        base = 2 * n / lay.world + 4 * shape.largest_layer_params if lay.zero_stage == 3 else 2 * n
        return [MemoryItem("model states", base / GIB, f"LoRA r={lay.lora_r}: frozen bf16 base weights" + (" sharded (ZeRO-3)" if lay.zero_stage == 3 else ""))]
    if lay.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: PLC0415

        _, gpu, _ = estimate_zero3_model_states_mem_needs(n, shape.largest_layer_params, per_node, nodes, cpu_offload=lay.offload_optimizer or lay.offload_params,
                                                           cpu_offload_params=lay.offload_params)
        off = "optimizer and parameters offloaded" if lay.offload_params else "optimizer offloaded" if lay.offload_optimizer else "no offload"
        return [MemoryItem("model states", gpu / GIB, f"DeepSpeed estimate_zero3_model_states_mem_needs, {lay.world} GPUs, {off}")]
    if lay.zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: PLC0415

        _, gpu = estimate_zero2_model_states_mem_needs(n, per_node, nodes, cpu_offload=lay.offload_optimizer)
        return [MemoryItem("model states", gpu / GIB, f"DeepSpeed estimate_zero2_model_states_mem_needs, {lay.world} GPUs")]
    if lay.precision == "bf16":
        return [MemoryItem("model states", 8 * n / GIB, "bf16 weights, gradients and AdamW moments, not sharded")]
    items = [MemoryItem("model states", 12 * n / GIB, "fp32 weights and AdamW moments")]
    if lay.accumulation > 1:
        items.append(MemoryItem("gradients", 4 * n / GIB, "fp32, kept across accumulated micro-batches"))
    if lay.precision == "amp":
        items.append(MemoryItem("autocast weight copies", 2 * n / GIB, "bf16 casts cached during the forward"))
    return items


def _lm_head_bytes(shape: ModelShape, lay: TrainLayout, tokens: int) -> tuple[float, str]:
    v, h = shape.vocab, shape.hidden
    if lay.lm_head == "full":
        return 12.0 * tokens * v, "full logits: bf16 logits, fp32 log-softmax and its gradient"
    if lay.lm_head == "liger":
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(v / h)))))
        return 2.0 * chunk * v * 4 + tokens * h * 4 + v * h * 4, f"Liger fused linear cross-entropy ({chunk}-token chunks)"
    tile = min(tokens, TRL_TOKEN_TILE) * min(v, TRL_VOCAB_TILE)
    return 2.0 * tile * 4 + tokens * h * 4, "TRL's tiled log-prob head (no full logits)"


def train_plan(shape: ModelShape, lay: TrainLayout, *, job: str = "train", capacity_gib: float | None = None) -> JobPlan:
    """The per-GPU memory of one training layout."""
    tokens = lay.tokens_per_gpu
    items = _model_states(shape, lay)
    if lay.ref_model:
        ref = 2 * shape.params / (lay.world if lay.zero_stage == 3 else 1)
        items.append(MemoryItem("reference model", ref / GIB, "GRPO beta > 0: bf16 weights"))
    residual = 2 if lay.precision == "bf16" else 4
    layer = _layer_bytes_per_token(shape, precision=lay.precision, liger=lay.liger) * tokens
    what_tokens = f"{lay.micro_batch} x {lay.seq_len} tokens" + (f" / SP {lay.sequence_parallel}" if lay.sequence_parallel > 1 else "") + f" = {tokens:,} per GPU"
    if lay.gradient_checkpointing:
        items.append(MemoryItem("activations: checkpoints", shape.layers * tokens * shape.hidden * residual / GIB, f"{shape.layers} layer inputs of {what_tokens}"))
        items.append(MemoryItem("activations: one layer recomputed", layer / GIB, "backward of one checkpointed layer" + (" (Liger)" if lay.liger else "")))
    else:
        items.append(MemoryItem("activations", shape.layers * layer / GIB, f"{shape.layers} layers of {what_tokens}, no checkpointing" + (" (Liger)" if lay.liger else "")))
    if lay.attn == "eager":  # the attention matrix, bf16 scores + fp32 softmax, per sequence and head
        per_layer = lay.micro_batch * shape.heads * lay.seq_len**2 * 6
        items.append(MemoryItem("eager attention scores", per_layer * (1 if lay.gradient_checkpointing else shape.layers) / GIB, "eager attention materialises seq x seq"))
    head, note = _lm_head_bytes(shape, lay, tokens)
    items.append(MemoryItem("LM head", head / GIB, note))
    zero = f"ZeRO-{lay.zero_stage}" if lay.zero_stage else "no ZeRO"
    what = (f"{shape.params / 1e9:.1f}B params ({shape.source}); {lay.world} GPUs, {zero}, micro-batch {lay.micro_batch} x {lay.seq_len}, "
            f"accumulation {lay.accumulation}, SP {lay.sequence_parallel}, grad ckpt {'on' if lay.gradient_checkpointing else 'off'}, "
            f"Liger {'on' if lay.liger else 'off'}, {lay.attn}")
    plan = JobPlan(job, what, items, capacity_gib)
    if lay.reserved_fraction:
        plan.budget_fraction = FIT_FRACTION - lay.reserved_fraction
        plan.notes.append(f"colocated vLLM takes {lay.reserved_fraction:.0%} of the GPU (rl.trl.vllm_gpu_memory_utilization)")
    return plan


def _accelerate_zero(root: Path, accelerate_config: str) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of an accelerate config; stage 0 without DeepSpeed."""
    import yaml  # noqa: PLC0415

    path = root / accelerate_config
    if not path.is_file():
        raise ConfigError(f"accelerate config {accelerate_config!r} does not exist")
    acc = yaml.safe_load(path.read_text()) or {}
    ds = acc.get("deepspeed_config") or {}
    if acc.get("distributed_type") == "FSDP":  # FSDP2 full shard: counted as ZeRO-3 (sharded states, one layer gathered)
        return 3, False, bool((acc.get("fsdp_config") or {}).get("fsdp_offload_params"))
    if acc.get("distributed_type") != "DEEPSPEED":
        return 0, False, False
    zero: dict[str, Any] = {"stage": ds.get("zero_stage", 0)}
    if ds.get("deepspeed_config_file"):
        file = Path(ds["deepspeed_config_file"])
        zero = json.loads((file if file.is_absolute() else root / file).read_text()).get("zero_optimization", {})
    off = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    return int(zero.get("stage", 0)), off("offload_optimizer"), off("offload_param")


def sft_layout(cfg: RecipeConfig, root: Path, *, world: int | None = None) -> TrainLayout:
    from sandlab.launch.cost import SFT_DEFAULTS  # noqa: PLC0415

    t = cfg.train
    stage, off_opt, off_par = _accelerate_zero(root, t.accelerate_config)
    trl = t.trl
    return TrainLayout(
        world=world or t.num_processes, gpus_per_node=cfg.cluster.gpus_per_node or t.num_processes, micro_batch=t.per_device_train_batch_size,
        seq_len=int(trl.get("max_length", SFT_DEFAULTS["max_length"])), accumulation=t.gradient_accumulation_steps, global_batch=t.global_batch_size,
        zero_stage=stage, offload_optimizer=off_opt, offload_params=off_par, gradient_checkpointing=bool(trl.get("gradient_checkpointing", True)),
        liger=bool(trl.get("use_liger_kernel", False)), sequence_parallel=t.sequence_parallel_size, lora_r=t.lora_r, attn=t.attn_implementation,
        precision="bf16" if trl.get("bf16", not trl.get("fp16", False)) else "fp32")


def grpo_layout(cfg: RecipeConfig, root: Path) -> TrainLayout:
    r = cfg.rl
    stage, off_opt, off_par = _accelerate_zero(root, r.accelerate_config)
    trl = r.trl
    completion = max(s.max_completion_length for s in r.stages)
    colocate = bool(trl.get("use_vllm")) and trl.get("vllm_mode", "server") == "colocate"
    return TrainLayout(
        world=r.num_processes, gpus_per_node=cfg.cluster.gpus_per_node or r.num_processes, micro_batch=r.per_device_train_batch_size,
        seq_len=int(trl.get("max_prompt_length", 512)) + completion, accumulation=r.gradient_accumulation_steps,
        global_batch=r.per_device_train_batch_size * r.num_processes * r.gradient_accumulation_steps, zero_stage=stage, offload_optimizer=off_opt,
        offload_params=off_par, gradient_checkpointing=bool(trl.get("gradient_checkpointing", True)), liger=bool(trl.get("use_liger_kernel", False)),
        attn=r.attn_implementation, precision="bf16" if trl.get("bf16", True) else "fp32", ref_model=float(trl.get("beta", 0.0)) > 0,
        reserved_fraction=float(trl.get("vllm_gpu_memory_utilization", 0.3)) if colocate else 0.0)


# ---- what would fit ------------------------------------------------------------------------------
def _sp_degrees(shape: ModelShape, lay: TrainLayout) -> list[int]:
    """Sequence-parallel degrees Ulysses accepts here: they divide the processes and the attention heads,
    and KV heads divide by them or they by the KV heads (DeepSpeed replicates KV heads then)."""
    return [k for k in range(2, lay.gpus_per_node + 1) if lay.world % k == 0 and shape.heads % k == 0 and (shape.kv_heads % k == 0 or k % shape.kv_heads == 0)]


def _relayout(lay: TrainLayout, **changes) -> TrainLayout | None:
    """The layout with ``changes``, gradient accumulation re-derived to keep the global batch; None when it cannot."""
    new = replace(lay, **changes)
    per_step = new.micro_batch * (new.world // new.sequence_parallel)
    if lay.global_batch % per_step:
        return None
    return replace(new, accumulation=lay.global_batch // per_step)


def _moves(shape: ModelShape, lay: TrainLayout, kind: str, nodes: int) -> list[tuple[int, list[str], str, str, dict[str, Any]]]:
    """(rank, overrides, description, step-time effect, layout changes) of each single change, cheapest first."""
    prefix = "train" if kind == "train" else "rl"
    out = []
    if lay.micro_batch > 1 and _relayout(lay, micro_batch=1):
        out.append((1, [f"{prefix}.per_device_train_batch_size=1"], "micro-batch 1 with more accumulation", "same tokens per step; smaller kernels",
                    {"micro_batch": 1}))
    if kind == "train":
        for k in _sp_degrees(shape, lay):
            if k > lay.sequence_parallel and _relayout(lay, sequence_parallel=k):
                out.append((2, [f"train.sequence_parallel_size={k}"], f"Ulysses sequence parallelism over {k} GPUs",
                            "two all-to-alls per layer inside the node", {"sequence_parallel": k}))
    if not lay.liger:
        out.append((3, [f"+{prefix}.trl.use_liger_kernel=true"], "Liger kernels (fused RMSNorm, RoPE, SwiGLU)", "none or faster", {"liger": True}))
    if not lay.gradient_checkpointing:
        out.append((4, [f"+{prefix}.trl.gradient_checkpointing=true"], "gradient checkpointing",
                    "about 25% slower (one more forward; 29.2% vs 39.2% MFU measured on H100)", {"gradient_checkpointing": True}))
    if lay.zero_stage == 3 and not lay.offload_optimizer:
        out.append((5, [f"{prefix}.accelerate_config=accelerate_configs/zero3_offload_optimizer.yaml"], "ZeRO-3 with the optimizer offloaded to CPU",
                    "CPU Adam step and PCIe traffic of the gradient and parameter shards every step", {"offload_optimizer": True}))
    if kind == "train":
        for more in (2, 4):
            if _relayout(lay, world=lay.world * more):
                out.append((6, [f"launcher.train.nodes={nodes * more}"], f"{nodes * more} nodes", f"{more}x the GPUs, about the same GPU-hours",
                            {"world": lay.world * more}))
    return out


def suggest(shape: ModelShape, lay: TrainLayout, plan: JobPlan, kind: str, nodes: int, *, limit: int = 3) -> list[Suggestion]:
    """The cheapest combinations of up to three changes that fit (fewest changes, then cheapest)."""
    found: list[tuple[tuple[int, ...], Suggestion]] = []
    moves = _moves(shape, lay, kind, nodes)
    for size in (1, 2, 3):
        for combo in itertools.combinations(moves, size):
            if len({m[0] for m in combo}) < size:  # one change of each kind
                continue
            new = _relayout(lay, **{k: v for m in combo for k, v in m[4].items()})
            if new is None:
                continue
            candidate = train_plan(shape, new, job=plan.job, capacity_gib=plan.capacity_gib)
            candidate.budget_fraction = plan.budget_fraction
            if candidate.fits:
                overrides = [o for m in combo for o in m[1]]
                # More nodes re-derive the accumulation at submit (training_layout); otherwise it is set here.
                if new.accumulation != lay.accumulation and not any("nodes=" in o for o in overrides):
                    overrides.append(f"{'train' if kind == 'train' else 'rl'}.gradient_accumulation_steps={new.accumulation}")
                found.append((tuple(sorted(m[0] for m in combo)), Suggestion(overrides, " + ".join(m[2] for m in combo), candidate.total_gib, "; ".join(m[3] for m in combo))))
        if len(found) >= limit:
            break
    found.sort(key=lambda f: (len(f[0]), f[0], f[1].total_gib))
    return [s for _, s in found[:limit]]


# ---- vLLM --------------------------------------------------------------------------------------------
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "auto": 2, "fp8": 1}


def vllm_plan(job: str, shape: ModelShape, *, tp: int, max_model_len: int, gpu_memory_utilization: float, dtype: str, max_num_seqs: int = 256,
              capacity_gib: float | None = None) -> JobPlan:
    b = DTYPE_BYTES.get(dtype, 2)
    weights = shape.params * b / tp
    kv_heads_per_gpu = max(1, shape.kv_heads // tp)  # fewer KV heads than GPUs: each GPU keeps one
    kv_per_token = 2 * shape.layers * kv_heads_per_gpu * shape.head_dim * b
    # vLLM profiles one forward of max_num_batched_tokens for activations; plus CUDA graphs and sampler logits.
    overhead = 1.5 * GIB + max_num_seqs * shape.vocab * 4
    items = [MemoryItem("weights", weights / GIB, f"{shape.params / 1e9:.1f}B params x {b} bytes / TP {tp}"),
             MemoryItem("runtime", overhead / GIB, "CUDA graphs, activations profile, sampler logits (rough)")]
    plan = JobPlan(job, f"vLLM, {shape.params / 1e9:.1f}B params ({shape.source}), TP {tp}, max_model_len {max_model_len}, gpu_memory_utilization {gpu_memory_utilization}",
                   items, capacity_gib, budget_fraction=gpu_memory_utilization)
    if capacity_gib is not None:
        kv_gib = capacity_gib * gpu_memory_utilization - plan.total_gib
        plan.items.append(MemoryItem("KV cache", max(kv_gib, 0.0), f"{kv_per_token / 1024:.0f} KiB per token per GPU"))
        plan.sequences = int(max(kv_gib, 0) * GIB // (kv_per_token * max_model_len))
        plan.notes.append(f"{plan.sequences} sequences of {max_model_len:,} tokens fit in the KV cache at once (bounds decode throughput)")
        if plan.sequences < 1:
            plan.items[-1].gib = kv_per_token * max_model_len / GIB  # one full sequence is the least it needs
    return plan


def vllm_suggestions(shape: ModelShape, plan: JobPlan, *, prefix: str, tp: int, gpus: int, max_model_len: int, util: float, dtype: str) -> list[Suggestion]:
    out = []
    for new_tp in (t for t in (2, 4, 8, 16) if tp < t <= gpus and shape.heads % t == 0):
        p = vllm_plan(plan.job, shape, tp=new_tp, max_model_len=max_model_len, gpu_memory_utilization=util, dtype=dtype, capacity_gib=plan.capacity_gib)
        if p.fits:
            out.append(Suggestion([f"{prefix}.tensor_parallel_size={new_tp}"], f"tensor parallelism {new_tp}", p.total_gib, "more GPUs per replica"))
            break
    if util < 0.95:
        p = vllm_plan(plan.job, shape, tp=tp, max_model_len=max_model_len, gpu_memory_utilization=0.95, dtype=dtype, capacity_gib=plan.capacity_gib)
        if p.fits:
            out.append(Suggestion([f"{prefix}.gpu_memory_utilization=0.95"], "a larger GPU share", p.total_gib, "none"))
    return out


# ---- reward model ------------------------------------------------------------------------------------
def reward_activation_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> float:
    """Peak bytes per token of one inference forward (no gradients, no KV cache), inside a layer's MLP:
    the residual and normed input, SiLU(gate), up and their product, RMSNorm's fp32 copy and RoPE's
    cos/sin. Checked against the allocations torch's profiler records (tests/test_memory_plan.py)."""
    return dtype_bytes * (2 * shape.hidden + 3 * shape.intermediate + shape.head_dim) + 4 * shape.hidden


def reward_model_plan(shape: ModelShape, rm, *, capacity_gib: float | None, colocated_share: float = 0.0, job: str = "reward model") -> JobPlan:
    """The score stage's reward model (transformers engine) on one GPU: weights, and one forward of the
    longest batch (``batch_size`` pairs cut to ``max_length``). ``colocated_share``: the part of the GPU an
    in-process vLLM teacher of the same job holds."""
    b = DTYPE_BYTES.get(rm.dtype, 2)
    tokens = rm.batch_size * rm.max_length
    items = [MemoryItem("weights", shape.params * b / GIB, f"{shape.params / 1e9:.2f}B params x {b} bytes"),
             MemoryItem("activations", tokens * reward_activation_bytes_per_token(shape, b) / GIB,
                        f"one forward of {rm.batch_size} x {rm.max_length:,} tokens, no KV cache"),
             # A padded batch under sdpa: transformers' boolean (batch, 1, length, length) mask; CUDA's fused
             # attention kernels keep no attention scores.
             MemoryItem("padding mask", rm.batch_size * rm.max_length**2 / GIB, "boolean attention mask of a padded batch")]
    plan = JobPlan(job, f"{shape.params / 1e9:.2f}B params ({shape.source}), batch {rm.batch_size} x {rm.max_length:,} tokens, {rm.dtype}",
                   items, capacity_gib, budget_fraction=max(0.0, FIT_FRACTION - colocated_share))
    if colocated_share:
        plan.notes.append(f"the job's in-process vLLM teacher holds {colocated_share:.0%} of the GPU while the reward model runs")
    if not plan.fits and capacity_gib is not None:
        size = rm.batch_size // 2
        while size >= 1:
            smaller = reward_model_plan(shape, replace(rm, batch_size=size), capacity_gib=capacity_gib, colocated_share=colocated_share, job=job)
            if smaller.fits:
                plan.suggestions = [Suggestion([f"data.score.reward_model.batch_size={size}"], f"batches of {size}", smaller.total_gib,
                                               f"{rm.batch_size // size}x more forwards")]
                break
            size //= 2
        if not plan.suggestions and colocated_share:
            plan.notes.append("no batch size fits beside the in-process teacher: serve the teacher (launcher.serve.enabled=true)")
    return plan


# ---- the recipe's plan ---------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    cluster: str
    capacity_gib: float | None
    jobs: list[JobPlan]

    @property
    def fits(self) -> bool:
        return all(j.fits for j in self.jobs)

    def misfits(self) -> list[JobPlan]:
        return [j for j in self.jobs if not j.fits]

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "capacity_gib": self.capacity_gib, "fits": self.fits,
                "jobs": [{**asdict(j), "total_gib": j.total_gib, "budget_gib": j.budget_gib, "fits": j.fits} for j in self.jobs]}

    def format(self) -> str:
        head = f"memory plan per GPU (cluster {self.cluster}: " + (f"{self.capacity_gib:g} GiB per GPU, budget {FIT_FRACTION:.0%} for training)" if self.capacity_gib else "no GPU memory known)")
        lines = [head]
        for j in self.jobs:
            ok = j.fits
            budget = f" of {j.budget_gib:.1f} GiB" if j.budget_gib is not None else ""
            lines.append(f"  {j.job}: {j.total_gib:.1f} GiB{budget} {'fits' if ok else 'DOES NOT FIT'}  [{j.what}]")
            lines += [f"    {i.name:<34} {i.gib:8.1f} GiB  {i.note}" for i in j.items]
            lines += [f"    note: {n}" for n in j.notes]
            for s in j.suggestions:
                lines.append(f"    fits with {s.what}: {s.total_gib:.1f} GiB  ({' '.join(s.overrides)}; step time: {s.step_time})")
        return "\n".join(lines)


def plan_recipe(cfg: RecipeConfig, root: Path, stages: list[str]) -> MemoryPlan | None:
    """The memory plan of the GPU jobs among ``stages``; None on a cluster without GPUs."""
    from sandlab.stages import get_stage  # noqa: PLC0415

    capacity = gpu_memory_gib(cfg.cluster)
    if capacity is None:
        return None
    gpus = cfg.cluster.gpus_per_node
    jobs: list[JobPlan] = []
    m = cfg.model
    student = None

    def student_shape() -> ModelShape:
        nonlocal student
        student = student or model_shape(m.path, m.architecture, m.num_params_b, what="model")
        return student

    if "train" in stages:
        shape = student_shape()
        nodes = cfg.launcher.train.nodes
        lay = sft_layout(cfg, root, world=nodes * gpus if gpus else None)
        check_sequence_parallel(shape, lay.sequence_parallel, lay.world)
        plan = train_plan(shape, lay, job="train", capacity_gib=capacity)
        if not plan.fits:
            plan.suggestions = suggest(shape, lay, plan, "train", nodes)
        jobs.append(plan)
    if "grpo" in stages:
        shape = student_shape()
        lay = grpo_layout(cfg, root)
        plan = train_plan(shape, lay, job="grpo", capacity_gib=capacity)
        if not plan.fits:
            plan.suggestions = suggest(shape, lay, plan, "grpo", cfg.launcher.train.nodes)
        jobs.append(plan)
    t = cfg.teacher
    serve = cfg.launcher.serve.enabled
    if any(get_stage(s).needs_teacher(cfg) for s in stages) and (t.backend == "vllm" or serve):
        shape = model_shape(t.model, t.architecture, t.num_params_b, what="teacher")
        jobs.append(_vllm_job("vllm teacher" + (" server" if serve else ""), shape, t, "teacher", gpus, capacity))
    if "passrate" in stages and cfg.data.passrate.student.backend == "vllm":
        p = cfg.data.passrate.student
        shape = student_shape() if p.model == "tuned" else model_shape(p.model, p.architecture, p.num_params_b, what="data.passrate.student")
        jobs.append(_vllm_job("vllm passrate", shape, p, "data.passrate.student", gpus, capacity, max_model_len=min(p.max_model_len, m.max_model_len)))
    score = cfg.data.score
    if "score" in stages and score.scorer == "reward_model" and (score.reward_model.device or "cuda") != "cpu":
        rm = score.reward_model
        shape = model_shape(rm.model, rm.architecture, rm.num_params_b, what="data.score.reward_model", classifier=True)
        if rm.engine == "vllm":
            args = rm.extra_engine_args
            jobs.append(vllm_plan("reward model (vLLM)", shape, tp=int(args.get("tensor_parallel_size", 1)), max_model_len=rm.max_length,
                                  gpu_memory_utilization=float(args.get("gpu_memory_utilization", 0.9)), dtype=rm.dtype, capacity_gib=capacity))
        else:
            # An in-process vLLM teacher of an earlier stage stays loaded on its GPUs (0 .. tp-1) while score runs.
            earlier = stages[: stages.index("score")]
            device = rm.device or "cuda"
            index = device.partition(":")[2]
            on_teacher_gpu = int(index) < t.tensor_parallel_size if index.isdigit() else True
            teacher_here = t.backend == "vllm" and not serve and on_teacher_gpu and any(get_stage(s).needs_teacher(cfg) for s in earlier)
            jobs.append(reward_model_plan(shape, rm, capacity_gib=capacity, colocated_share=t.gpu_memory_utilization if teacher_here else 0.0))
    if "eval" in stages and cfg.eval.backend.backend == "vllm":
        e = cfg.eval.backend
        jobs.append(_vllm_job("vllm eval", student_shape(), e, "eval.backend", gpus, capacity))
    return MemoryPlan(cfg.cluster.name, capacity, jobs)


def _vllm_job(job: str, shape: ModelShape, backend, prefix: str, gpus: int, capacity: float, *, max_model_len: int | None = None) -> JobPlan:
    length = max_model_len or backend.max_model_len
    plan = vllm_plan(job, shape, tp=backend.tensor_parallel_size, max_model_len=length, gpu_memory_utilization=backend.gpu_memory_utilization,
                     dtype=backend.dtype, capacity_gib=capacity)
    if not plan.fits:
        plan.suggestions = vllm_suggestions(shape, plan, prefix=prefix, tp=backend.tensor_parallel_size, gpus=gpus, max_model_len=length,
                                            util=backend.gpu_memory_utilization, dtype=backend.dtype)
    elif plan.sequences is not None and plan.sequences < 4 and 2 * backend.tensor_parallel_size <= gpus:
        wider = vllm_plan(job, shape, tp=2 * backend.tensor_parallel_size, max_model_len=length, gpu_memory_utilization=backend.gpu_memory_utilization,
                          dtype=backend.dtype, capacity_gib=capacity)
        plan.notes.append(f"few full-length sequences at once: {prefix}.tensor_parallel_size={2 * backend.tensor_parallel_size} would hold "
                          f"{wider.sequences} per replica")
    return plan


def check_sequence_parallel(shape: ModelShape, sp: int, world: int) -> None:
    if sp <= 1:
        return
    if world % sp:
        raise ConfigError(f"train.sequence_parallel_size={sp} does not divide the {world} training processes")
    if shape.heads % sp:
        raise ConfigError(f"train.sequence_parallel_size={sp} does not divide the model's {shape.heads} attention heads (Ulysses splits heads)")
    if shape.kv_heads % sp and sp % shape.kv_heads:
        raise ConfigError(f"train.sequence_parallel_size={sp} and the model's {shape.kv_heads} KV heads: one must divide the other")


def misfit_message(plan: MemoryPlan) -> str:
    """The one line a submission stops with."""
    bad = plan.misfits()
    j = bad[0]
    fix = f"; fits with {j.suggestions[0].what}: {' '.join(j.suggestions[0].overrides)}" if j.suggestions else "; no single change found: see the plan above"
    budget = f"{j.budget_gib:.1f}" if j.budget_gib is not None else "?"
    return f"the {j.job} job needs {j.total_gib:.1f} GiB per GPU, over the {budget} GiB budget of {plan.cluster}'s GPUs{fix}"
