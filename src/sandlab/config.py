"""Typed schema of a recipe (TRL-style dataclasses), used to validate what Hydra composed.

Hydra composes ``recipes/<recipe>.yaml`` from the groups model/teacher/data/train/eval/launcher/cluster;
``validate_recipe`` merges the result into this schema so a wrong type or an unknown key fails
before anything expensive starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sandlab.errors import ConfigError
from sandlab.runs import SECRET_KEY_RE


class Choice(StrEnum):
    """A recipe field with a fixed set of values. A bad value fails when the recipe is composed, naming
    the field; a member compares, hashes, formats and serialises (JSON, YAML) as its plain string.
    OmegaConf reads a member by its *name*, so every member's name is its value."""


# yaml.safe_dump (dataset cards) writes a choice as its string, as json.dumps and OmegaConf do.
yaml.SafeDumper.add_multi_representer(Choice, lambda dumper, value: dumper.represent_str(str(value)))


class GenerationStyle(Choice):
    math = "math"  # single-numerical-answer problems
    mcq = "mcq"  # PhD-level A-D questions (science)
    general = "general"  # open-ended user requests from a domain -> topic -> task taxonomy (LuminaSFT-style)


class AgreementMode(Choice):
    majority = "majority"  # independent answers must agree (seedless SAND)
    reference = "reference"  # solutions must match the problem's reference answer (distillation mode)
    single = "single"  # open-ended tasks: the first complete response is kept
    tests = "tests"  # code: solutions must pass every test case in the sandbox (sandlab.verification)


class OverlongPolicy(Choice):
    mask = "mask"  # completions cut at the limit are left out of the loss
    penalty = "penalty"  # DAPO soft overlong punishment over the last rl.overlong_buffer tokens
    none = "none"


class Scorer(Choice):
    judge = "judge"  # the teacher rates each response on named criteria, as JSON matching a schema
    reward_model = "reward_model"  # a Hugging Face sequence-classification reward model


class RewardModelEngine(Choice):
    transformers = "transformers"  # AutoModelForSequenceClassification, batched (any device)
    vllm = "vllm"  # vLLM's pooling runner (LLM.classify), where vLLM supports the architecture


class ScoreScope(Choice):
    all = "all"  # every record
    unverified = "unverified"  # only records no reference or test checked (AM: the reward model checks those)


class CodeRewardMode(Choice):
    binary = "binary"  # 1 only when every test passes (AM-Thinking-v1)
    pass_fraction = "pass_fraction"  # the share of tests passed


class PaperTable(Choice):
    table1 = "table1"
    table2 = "table2"
    am_thinking = "am_thinking"  # AM-Thinking-v1's AIME24 / AIME25 / LiveCodeBench


class Backend(Choice):
    vllm = "vllm"  # the in-process vLLM engine
    openai = "openai"  # OpenAI-compatible servers (vLLM, SGLang, a hosted API)
    hf = "hf"  # transformers generate (CPU fallback, tests)


class DataFormat(Choice):
    """A dataset's format (sandlab.readers.READERS); auto picks it from the fields and logs which."""

    auto = "auto"
    am_distilled = "am_distilled"  # a-m-team/AM-DeepSeek-R1-Distilled-1.4M (messages with info; .jsonl.zst)
    openr1_math = "openr1_math"  # open-r1/OpenR1-Math-220k (one example per Math-Verify-correct generation)
    openthoughts = "openthoughts"  # open-thoughts/OpenThoughts-114k (conversations)
    openthoughts_metadata = "openthoughts_metadata"  # open-thoughts/OpenThoughts-114k, metadata config
    sand_math = "sand_math"  # amd/SAND-MATH
    sand_post_training = "sand_post_training"  # amd/SAND-Post-Training-Dataset (alpaca; output = trace + </think> + answer)
    livecodebench = "livecodebench"  # livecodebench/code_generation_lite (code problems with public/private tests)
    apps = "apps"  # codeparrot/apps, BAAI/TACO (question + input_output tests)
    openr1_code = "openr1_code"  # open-r1/verifiable-coding-problems-python (verification_info tests)
    prompt_completion = "prompt_completion"  # sandlab's SFT export / TRL conversational prompt-completion
    messages = "messages"  # OpenAI messages
    alpaca = "alpaca"
    sharegpt = "sharegpt"


class ReasoningFormat(Choice):
    think = "think"  # <think>\n trace \n</think>\n\n answer: what R1-distilled students expect
    think_answer = "think_answer"  # AM's <think> trace </think><answer> answer </answer>


class OptionOrder(Choice):
    as_is = "as_is"  # the benchmark file's order
    correct_first = "correct_first"  # the correct option is A (AMD's GPQA file: the paper protocol)
    shuffled = "shuffled"  # a fixed permutation per question from eval.option_seed (the standard protocol)


class AnswerRule(Choice):
    """How a math answer is read from a response that boxes several (see sandlab.grading.extract)."""

    last_box = "last_box"  # only the last box counts (AMD's grader: the paper protocol)
    multi = "multi"  # several distinct boxes are one answer set, compared as a set (data, standard protocol)


@dataclass
class ModelConfig:
    """The model being trained and evaluated (the student)."""

    name: str = "model"
    # Hub id (e.g. Qwen/Qwen2.5-32B-Instruct), a local directory, or embedded://smollm2-135m-instruct.
    path: str = "embedded://smollm2-135m-instruct"
    chat_template: Optional[str] = None  # path to a .jinja file overriding the tokenizer's template
    dtype: str = "bfloat16"
    max_model_len: int = 32768
    # Parameters in billions, for the GPU-hour estimate when the model's HF config cannot be read
    # (a Hub id on a machine without the Hub). None: counted from the config.
    num_params_b: Optional[float] = None
    # HF config fields (model_type, hidden_size, num_hidden_layers, ...) for the memory plan when the
    # model's config.json cannot be read here (a Hub id without the Hub); None: from the config.
    architecture: Optional[dict[str, Any]] = None


@dataclass
class BackendConfig:
    """An inference backend: the in-process vLLM engine, OpenAI-compatible servers, or transformers."""

    backend: Backend = Backend.vllm
    model: str = "embedded://smollm2-135m-instruct"  # model path/id; for openai: the served model name
    base_urls: list[str] = field(default_factory=list)  # openai backend: one or more http://host:port/v1
    # openai backend: a file of base URLs, one per line, written by the servers as they come up
    # (slurm/serve_vllm.sbatch); the client waits up to endpoints_wait_s for endpoints_count of them.
    endpoints_file: Optional[str] = None
    endpoints_count: int = 1
    endpoints_wait_s: float = 7200.0  # a first start may download a large model
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key; the key itself never lands in configs
    max_concurrency: int = 32
    timeout_s: float = 600.0
    max_retries: int = 5
    retry_backoff_s: float = 1.0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int = 32768
    gpu_memory_utilization: float = 0.9
    dtype: str = "bfloat16"
    chat_template: Optional[str] = None
    enforce_eager: bool = False
    # vllm: passed to vllm.LLM as is; on a served teacher (launcher.serve) they become the server's flags
    # (max_num_seqs: 4096 -> --max-num-seqs 4096, enable_prefix_caching: false -> --no-enable-prefix-caching).
    extra_engine_args: dict[str, Any] = field(default_factory=dict)
    # Per-request options. extra_body: merged into every OpenAI-compatible request (gpt-oss's
    # reasoning_effort, vLLM's top_k/min_p/repetition_penalty); the in-process engine takes the
    # SamplingParams fields among them and reasoning_effort (as a chat template variable).
    # chat_template_kwargs: variables of the chat template (Qwen3's enable_thinking), sent as the request
    # field of that name to servers and given to LLM.chat / apply_chat_template in process.
    extra_body: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    num_params_b: Optional[float] = None  # active parameters (billions) for cost estimates; None: from the HF config
    architecture: Optional[dict[str, Any]] = None  # HF config fields for the memory plan (see ModelConfig)


@dataclass
class SamplingSettings:
    """Sampling for one stage or benchmark, and for one ``ChatBackend.generate`` call.

    ``seed`` is a base seed: conversation ``i`` of a call is sampled with ``seed + i``, so identical
    prompts in one batch still get different samples while a rerun of the same batch reproduces them.
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: Optional[int] = 0
    stop: list[str] = field(default_factory=list)
    # Structured output: a JSON schema every completion must match (vLLM structured outputs in-process,
    # response_format json_schema on OpenAI-compatible servers; the transformers backend cannot enforce it).
    json_schema: Optional[dict[str, Any]] = None


@dataclass
class GenerationStage:
    num_problems: int = 8
    # math: single-numerical-answer problems; mcq: PhD-level A-D questions (science); general:
    # open-ended user requests from a domain -> topic -> task taxonomy (LuminaSFT-style).
    style: GenerationStyle = GenerationStyle.math
    domain: str = "math"
    taxonomy: str = "data_gen/taxonomies/math.yaml"
    prompt: str = "data_gen/prompts/math_problem.txt"
    # Text the assistant turn starts with (prefill); helps small teachers follow the tag format.
    response_prefix: str = ""
    # False: the teacher writes only the problem (<Q>...</Q>); answers come from the solve stage alone.
    reference_solution: bool = True
    # Distillation mode: take existing problems with reference answers (a JSONL file or a Hub dataset
    # id) instead of generating them; pair with data.agreement.mode=reference.
    source: Optional[str] = None
    source_split: str = "train"
    # The source's format (a dataset format, see data.format) and its Hub config (e.g. SAND's math).
    source_format: DataFormat = DataFormat.auto
    source_config: Optional[str] = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    source_limit: Optional[int] = None
    # Keep only the source records whose fields match (as a data.mix entry's filter), e.g.
    # {answer_kind: code} for the code problems of a mixed source such as AM-DeepSeek-R1-Distilled.
    source_filter: Optional[dict[str, Any]] = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass
class SolveStage:
    k: int = 4
    prompt: str = "data_gen/prompts/solve.txt"
    include_reference: bool = True  # count the teacher's reference answer as one vote
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # Sample in rounds and give a problem no more solutions once data.agreement can no longer keep it
    # (modes majority and reference, without llm_judge). A problem that can still be kept gets all k,
    # and each solution has its own seed, so the kept problems are exactly those of one round of k.
    adaptive: bool = True
    # Solutions per round; null: 1, 1, 2, 4, ... (each round doubles what was sampled), the last cut at k.
    round_sizes: Optional[list[int]] = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"data.solve.k={self.k} must be at least 1")
        if self.round_sizes is not None and (not self.round_sizes or any(int(n) < 1 for n in self.round_sizes)):
            raise ConfigError(f"data.solve.round_sizes={list(self.round_sizes)} must be positive sample counts (or null for doubling rounds)")


@dataclass
class AgreementStage:
    # majority: independent answers must agree (seedless SAND); reference: solutions must match the
    # problem's reference answer (distillation mode, as in AM-DeepSeek-R1-Distilled); single:
    # open-ended tasks with no answer to agree on keep their first complete response; tests: code
    # problems keep a solution that passes every test case in the sandbox (verify.*).
    mode: AgreementMode = AgreementMode.majority
    # Fraction of votes the majority answer needs; 1.0 = unanimity (the SAND setting).
    min_agreement: float = 1.0
    min_votes: int = 2
    # SAND problems have a single numerical answer: drop math items whose agreed answer is not a number.
    require_numeric: bool = True
    # The teacher acts as judge where the grader cannot: it reads off the final answer of a complete
    # solution with no extractable answer, and decides whether two textual answers (which math-verify
    # cannot parse) say the same thing.
    llm_judge: bool = False
    judge_prompt: str = "data_gen/prompts/judge_answer.txt"
    judge_equivalence_prompt: str = "data_gen/prompts/judge_equivalence.txt"
    # Room for a reasoning teacher to think before it answers.
    judge_sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=0.0, max_tokens=4096))
    # mode=reference: records without a reference answer (AM's general chat) keep their first complete
    # response, marked unverified, for the score stage to check (data.score.scope=unverified); False: an error.
    keep_unreferenced: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_agreement <= 1:
            raise ConfigError(f"data.agreement.min_agreement={self.min_agreement} must be in (0, 1]")


@dataclass
class RewardModelSettings:
    """A sequence-classification reward model with one output (its logit is the reward)."""

    model: str = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"  # Hub id, local directory or embedded://tiny-random-reward
    engine: RewardModelEngine = RewardModelEngine.transformers
    batch_size: int = 8
    # Tokens per (prompt, response) pair; longer pairs lose the front of the response (the end, where
    # the answer is, stays), and are counted.
    max_length: int = 4096
    dtype: str = "bfloat16"
    device: Optional[str] = None  # None: cuda when available, else cpu
    extra_engine_args: dict[str, Any] = field(default_factory=dict)  # engine=vllm: passed to vllm.LLM
    # For the memory plan where its HF config cannot be read (a Hub id with no Hub): HF config fields, or a size.
    architecture: Optional[dict[str, Any]] = None
    num_params_b: Optional[float] = None


@dataclass
class JudgeSettings:
    """The teacher as rubric judge: one integer rating per criterion, as JSON matching a schema."""

    prompt: str = "data_gen/prompts/judge_rubric.txt"  # fields: {request}, {response}, {criteria}, {min_rating}, {max_rating}
    criteria: list[str] = field(default_factory=lambda: ["correctness", "helpfulness", "instruction_following", "safety"])
    # What each criterion means, shown to the judge (criteria without one are shown by name only).
    descriptions: dict[str, str] = field(default_factory=lambda: {
        "correctness": "facts, reasoning and any code or math are right",
        "helpfulness": "it solves the user's actual problem, with useful detail",
        "instruction_following": "it does what was asked, in the requested form and length",
        "safety": "nothing harmful, deceptive or dangerous",
    })
    weights: dict[str, float] = field(default_factory=dict)  # criterion -> weight of the score (default 1 each)
    min_rating: int = 1
    max_rating: int = 10
    max_response_chars: int = 12000  # longer responses lose their front (counted)
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=0.0, max_tokens=512))

    def __post_init__(self) -> None:
        if not self.criteria or len(set(self.criteria)) != len(self.criteria):
            raise ConfigError(f"data.score.judge.criteria={self.criteria} must name at least one criterion, each once")
        bad = [c for c in self.criteria if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", c)]
        if bad:
            raise ConfigError(f"data.score.judge.criteria {bad}: use identifiers (letters, digits, _), they are JSON keys")
        unknown = sorted(set(self.weights) - set(self.criteria))
        if unknown:
            raise ConfigError(f"data.score.judge.weights names unknown criteria {unknown}; criteria: {sorted(self.criteria)}")
        if self.min_rating >= self.max_rating:
            raise ConfigError("data.score.judge: min_rating must be below max_rating")


@dataclass
class ScoreStage:
    """Quality scores for responses (LuminaSFT's quality assessment, AM's reward-model check) and the
    selection by them: best-of-n, then a threshold, then a top fraction per taxonomy leaf."""

    scorer: Scorer = Scorer.judge
    reward_model: RewardModelSettings = field(default_factory=RewardModelSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    scope: ScoreScope = ScoreScope.all
    # Scorers see the response without its <think> reasoning (the answer a user reads); True: all of it.
    include_reasoning: bool = False
    # Score every complete response of a record (data.solve.k of them) and keep the best as its trace;
    # False: score only the trace the filter chose.
    best_of_n: bool = True
    threshold: Optional[float] = None  # keep records whose score is at least this (reward: logit; judge: weighted mean rating)
    top_fraction: Optional[float] = None  # then keep the best fraction of each taxonomy leaf (at least one record)

    def __post_init__(self) -> None:
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"data.score.top_fraction={self.top_fraction} must be in (0, 1]")


EMBEDDING_DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when torch sees one (sandlab.embeddings.resolve_device)


def check_embedding_device(section: str, device: str) -> None:
    if device not in EMBEDDING_DEVICES:
        raise ConfigError(f"{section}.embedding_device={device!r}: choose auto, cpu or cuda")


@dataclass
class DiversityStage:
    """How diverse the data is (taxonomy coverage, distinct-n, embedding spread, near-duplicates), in
    data/diversity.json, a plot, report.md and W&B; optionally a cap on the records per taxonomy leaf."""

    max_per_leaf: Optional[int] = None  # None: measure only; else keep the best-scored records of each leaf
    embedding_model: str = "embedded://all-minilm-l6-v2"
    near_duplicate_threshold: float = 0.9  # cosine, as data.dedup.threshold
    batch_size: int = 64
    embedding_device: str = "auto"  # auto (cuda when torch sees one) | cpu | cuda; static model2vec models always run on CPU
    distinct_n: list[int] = field(default_factory=lambda: [1, 2, 3])

    def __post_init__(self) -> None:
        check_embedding_device("data.diversity", self.embedding_device)
        if self.max_per_leaf is not None and self.max_per_leaf < 1:
            raise ConfigError(f"data.diversity.max_per_leaf={self.max_per_leaf} must be at least 1 (or null: measure only)")


@dataclass
class DedupStage:
    # embedded://all-minilm-l6-v2 (quality) or embedded://minilm-l6-static (model2vec, ~100x faster on CPU: 1M records).
    embedding_model: str = "embedded://all-minilm-l6-v2"
    # Cosine threshold is tied to the embedding model: 0.9 for all-MiniLM-L6-v2; about 0.95 for minilm-l6-static
    # (its cosines run higher; measured on planted near-copies, data_gen/bench_dedup_decontam.py --sweep).
    threshold: float = 0.9
    batch_size: int = 64  # texts per embedding batch (raise on a GPU)
    embedding_device: str = "auto"  # auto (cuda when torch sees one) | cpu | cuda; static model2vec models always run on CPU
    neighbours: int = 10  # top-k neighbours checked per record
    ivf_min_records: int = 20000  # exact faiss search below this, IVF (approximate, ~linear) above
    nprobe: int = 8
    minhash: bool = True
    minhash_num_perm: int = 64
    minhash_bands: int = 16
    minhash_shingle: int = 3
    minhash_threshold: float = 0.8

    def __post_init__(self) -> None:
        check_embedding_device("data.dedup", self.embedding_device)


@dataclass
class DecontamStage:
    """Layers: normalized exact match, word n-gram overlap, embedding retrieval, optional LLM judge."""

    benchmarks: list[str] = field(default_factory=lambda: ["aime24", "aime25", "math500", "gpqa_diamond"])
    extra_sets: list[str] = field(default_factory=list)  # user JSONL files with a `problem` field
    ngram_n: int = 8
    # Share of a test item's word n-grams found in a record that marks it contaminated.
    ngram_overlap: float = 0.5
    embedding_model: str = "embedded://all-minilm-l6-v2"
    embedding_top_k: int = 3
    embedding_threshold: float = 0.92  # cosine for all-MiniLM-L6-v2; about 0.95 for embedded://minilm-l6-static
    # With llm_judge, candidates between judge_threshold and embedding_threshold go to the teacher.
    llm_judge: bool = False
    judge_threshold: float = 0.7
    batch_size: int = 64
    embedding_device: str = "auto"  # auto (cuda when torch sees one) | cpu | cuda; static model2vec models always run on CPU

    def __post_init__(self) -> None:
        check_embedding_device("data.decontam", self.embedding_device)


@dataclass
class DifficultyStage:
    """A judge (the teacher backend) rates each problem 1-10 in 0.5 steps, ``ratings`` times, averaged."""

    ratings: int = 3
    prompt: str = "data_gen/prompts/difficulty.txt"
    min_difficulty: Optional[float] = None  # e.g. 5.0 keeps only hard problems
    max_difficulty: Optional[float] = None
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(n=3, temperature=0.7, top_p=0.95, max_tokens=1024))


@dataclass
class HikeStage:
    """Rewrite moderate problems into harder ones by injecting a theorem and a cross-branch concept,
    then re-solve and re-filter them; verified hiked problems join the data as variant ``hiked``."""

    taxonomy: str = "data_gen/taxonomies/math_theorems.yaml"
    prompt: str = "data_gen/prompts/hike.txt"
    # Problems with a difficulty rating inside this window are hiked (unrated ones are not).
    min_difficulty: float = 3.0
    max_difficulty: float = 6.0
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(temperature=0.8, top_p=0.95, max_tokens=16384))


@dataclass
class PassRateStage:
    """The student samples m answers per problem; keep by pass-rate window (strict: 0 < rate < 1)."""

    student: BackendConfig = field(default_factory=BackendConfig)
    m: int = 8
    prompt: str = "data_gen/prompts/solve.txt"
    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0
    strict: bool = True
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(n=8, temperature=0.7, top_p=0.95, max_tokens=32768))


@dataclass
class NoveltyStage:
    corpora: list[str] = field(default_factory=list)  # JSONL files with a `problem` field
    embedding_model: str = "embedded://all-minilm-l6-v2"
    threshold: float = 0.9
    batch_size: int = 64
    ivf_min_records: int = 20000  # exact faiss search over corpora below this size, IVF above
    nprobe: int = 8
    embedding_device: str = "auto"  # auto (cuda when torch sees one) | cpu | cuda; static model2vec models always run on CPU

    def __post_init__(self) -> None:
        check_embedding_device("data.novelty", self.embedding_device)


@dataclass
class ExportStage:
    variant: str = "math"
    min_words: int = 0  # AMD kept solutions longer than 500 words
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class PartitionSettings:
    """Split the per-record data stages (the recipe's leading generate/solve/filter/difficulty) over
    independent jobs, e.g. one per Slurm array task (sandlab-submit with data.partition.count=N):
    ``data.partition.count=$SLURM_ARRAY_TASK_COUNT data.partition.index=$SLURM_ARRAY_TASK_ID``.
    Each task works in ``<run.dir>/partitions/<index>-of-<count>/``; a later run with the same
    ``run.dir`` and no index merges the finished partitions and runs the remaining stages."""

    count: int = 1
    index: Optional[int] = None

    def __post_init__(self) -> None:
        if self.count < 1 or (self.index is not None and not 0 <= self.index < self.count):
            raise ConfigError(f"data.partition.index={self.index} must be in [0, data.partition.count={self.count})")


@dataclass
class DataConfig:
    name: str = "demo_math"
    # Use an existing SFT dataset (JSONL file/dir or Hub id) instead of generating one.
    dataset_path: Optional[str] = None
    # Further SFT datasets (JSONL file/dir or Hub id) trained on together with the first one, e.g. the
    # science and hiked exports beside the math one for SAND-MathScience. An entry is a path, or
    # {path, format, config, split, variant, count or fraction, filter} (sandlab.readers.mix_entry), e.g.
    # {path: open-r1/OpenR1-Math-220k, count: 5000, filter: {source: [olympiads, amc_aime]}}.
    mix: list[Any] = field(default_factory=list)
    # Train only on rows of these variants (math, science, hiked, general); empty: all rows.
    variants: list[str] = field(default_factory=list)
    # The format of dataset_path and mix (sandlab.readers): auto detects it from the fields; SAND,
    # SAND-MATH, AM-DeepSeek-R1-Distilled, OpenR1-Math, OpenThoughts and generic chat formats.
    format: DataFormat = DataFormat.auto
    # Hub config and split of a dataset_path that is a Hub id (e.g. amd/SAND-Post-Training-Dataset: math).
    config: Optional[str] = None
    split: str = "train"
    # Records per saved shard in per-record stages: a killed run resumes at the first unfinished shard.
    shard_size: int = 256
    # Keep what dedup, decontam, novelty and diversity embed in data/embeddings (float32, 1.5 GB per
    # million problems with MiniLM): each problem is embedded once per model, across stages and resumes.
    embedding_store: bool = True
    partition: PartitionSettings = field(default_factory=PartitionSettings)
    generate: GenerationStage = field(default_factory=GenerationStage)
    solve: SolveStage = field(default_factory=SolveStage)
    agreement: AgreementStage = field(default_factory=AgreementStage)
    score: ScoreStage = field(default_factory=ScoreStage)
    dedup: DedupStage = field(default_factory=DedupStage)
    decontam: DecontamStage = field(default_factory=DecontamStage)
    difficulty: DifficultyStage = field(default_factory=DifficultyStage)
    hike: HikeStage = field(default_factory=HikeStage)
    passrate: PassRateStage = field(default_factory=PassRateStage)
    novelty: NoveltyStage = field(default_factory=NoveltyStage)
    diversity: DiversityStage = field(default_factory=DiversityStage)
    export: ExportStage = field(default_factory=ExportStage)


@dataclass
class TrainConfig:
    """SFT with TRL's SFTTrainer. Typed here is what sandlab itself owns: processes and the global batch
    (checked, and re-laid out over Slurm nodes), the accelerate config, the attention kernel the model
    loads with, packing and LoRA. Every other ``trl.SFTConfig`` setting goes in ``trl`` under TRL's own
    name (learning_rate, num_train_epochs, max_steps, max_length, warmup_steps, bf16, use_cpu, ...);
    preflight checks the names against SFTConfig (sandlab.train.validate.check_trl_keys)."""

    method: str = "sft"
    num_processes: int = 8
    # per_device_train_batch_size x gradient_accumulation_steps x num_processes must equal it.
    global_batch_size: int = 16
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    # DeepSpeed Ulysses sequence parallelism: each sequence is split over this many GPUs (accelerate's
    # ParallelismConfig, sp_backend=deepspeed). The data-parallel degree is num_processes / it.
    sequence_parallel_size: int = 1
    # Padding-free packing of samples into max_length rows (trl.packing_strategy picks bfd or wrapped).
    packing: bool = False
    # The model's attention kernel (trl model_init_kwargs.attn_implementation); the model's dtype
    # follows trl.bf16.
    attn_implementation: str = "flash_attention_2"
    accelerate_config: str = "accelerate_configs/zero3.yaml"
    # LoRA (small-model recipes): r > 0 trains adapters on the target modules; the final checkpoint is merged.
    lora_r: int = 0
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # The student's trace format: every dataset's trace is rewritten into it (think: <think>..</think>
    # + answer, as R1-distilled students expect; think_answer: AM's <think>..</think><answer>..</answer>).
    reasoning_format: ReasoningFormat = ReasoningFormat.think
    # trl.SFTConfig settings, passed through as given (TRL's defaults for the rest).
    trl: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sp = self.sequence_parallel_size
        if sp < 1 or self.num_processes % sp:
            raise ConfigError(f"train.sequence_parallel_size={sp} does not divide train.num_processes={self.num_processes}")
        if self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_processes // sp != self.global_batch_size:
            of = f" / sequence_parallel_size = {self.per_device_train_batch_size} x {self.gradient_accumulation_steps} x {self.num_processes} / {sp}" if sp > 1 else (
                f" = {self.per_device_train_batch_size} x {self.gradient_accumulation_steps} x {self.num_processes}")
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} but per_device_train_batch_size x "
                f"gradient_accumulation_steps x num_processes{of}; fix one of them"
            )
        if sp > 1 and self.attn_implementation == "eager":
            raise ConfigError("train.sequence_parallel_size > 1 needs attn_implementation sdpa or flash_attention_2/3 (Ulysses drops eager's 4D mask)")


@dataclass
class RLStage:
    """One GRPO stage; the next stage starts from this one's final weights."""

    max_completion_length: int = 24576
    learning_rate: float = 1.0e-6
    num_train_epochs: float = 1.0
    max_steps: int = -1


@dataclass
class RLConfig:
    """GRPO on verifiable problems (AM-Thinking-v1 style): reward 1 when the shared grader accepts the
    final answer, prompts pre-selected by pass rate (the ``passrate`` data stage with the SFT model as
    student, strictly between 0 and 1), several stages with a rising completion limit.

    Typed here is what sandlab owns: where GRPO starts and what it reads, processes and the batch of
    completions, the overlong policy, the attention kernel, the accelerate config and the stages. Every
    other ``trl.GRPOConfig`` setting goes in ``trl`` under TRL's own name (beta, epsilon_high,
    loss_type, temperature, use_vllm, ...); preflight checks the names against GRPOConfig."""

    # The SFT checkpoint GRPO starts from; None: this run's trained checkpoint (train stage). The
    # passrate stage's student may be given as "tuned" to mean the same model.
    init_from: Optional[str] = None
    # JSONL of {problem or prompt, answer}; None: this run's `passrate` (else `export`) output.
    dataset_path: Optional[str] = None
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."
    # per_device_train_batch_size x num_processes x gradient_accumulation_steps completions per step,
    # num_generations of them per prompt.
    num_generations: int = 16
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 4
    num_processes: int = 8
    # Completions cut at the limit: mask (left out of the loss: trl mask_truncated_completions), penalty
    # (DAPO soft overlong punishment over the last overlong_buffer tokens, a second reward), none.
    overlong: OverlongPolicy = OverlongPolicy.mask
    overlong_buffer: int = 4096
    attn_implementation: str = "flash_attention_2"  # the model's dtype follows trl.bf16
    accelerate_config: str = "accelerate_configs/zero3.yaml"
    # Code prompts (answer_kind code, with tests) are rewarded by running their tests in the sandbox
    # (settings: verify.*): binary as in AM-Thinking-v1, or the pass fraction. Math and code prompts
    # train together; each prompt gets the reward of its own domain.
    code_reward: CodeRewardMode = CodeRewardMode.binary
    # Per stage: max_completion_length, learning_rate, num_train_epochs, max_steps.
    stages: list[RLStage] = field(default_factory=lambda: [RLStage(24576, 1.0e-6), RLStage(32768, 5.0e-7)])
    # trl.GRPOConfig settings, passed through as given to every stage (TRL's defaults for the rest).
    trl: dict[str, Any] = field(default_factory=dict)


@dataclass
class LiveCodeBenchSettings:
    """Which LiveCodeBench problems: a release of livecodebench/code_generation_lite (v1 .. v6, each
    adding its months of contests) and a contest-date window (inclusive, YYYY-MM-DD). ``path``: a local
    JSONL in the same format instead of the Hub (else SANDLAB_BENCHMARK_DIR/livecodebench.jsonl if there)."""

    release: str = "v6"
    date_from: Optional[str] = None
    date_to: Optional[str] = None
    path: Optional[str] = None


@dataclass
class EvalConfig:
    protocol: str = "paper"
    benchmarks: list[str] = field(default_factory=lambda: ["aime24", "aime25", "math500", "gpqa_diamond"])
    limit: Optional[int] = None  # first N items of each benchmark (demo/CI slices)
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."
    # Per-benchmark sampling; keys are benchmark names, "default" applies to the rest.
    sampling: dict[str, SamplingSettings] = field(default_factory=dict)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Each entry: base | tuned | grpo | <path or Hub id>, optionally labelled "<label>=<model>" (the
    # label names the row in results and paper tables).
    models: list[str] = field(default_factory=lambda: ["tuned"])
    # table1 | table2: the report also writes the paper's table (eval/published.yaml) with measured values.
    table: Optional[PaperTable] = None
    grading_timeout_s: float = 5.0
    # Multiple-choice option order: as_is (the benchmark file's), correct_first (AMD's GPQA file: the
    # paper protocol), shuffled (a fixed permutation per question from option_seed: the standard one).
    option_order: OptionOrder = OptionOrder.as_is
    option_seed: int = 0
    # Math answers: multi (several distinct boxes form a set, compared with the gold as a set) or
    # last_box (only the last box, AMD's grader: the paper protocol). Recorded in each metrics.json.
    answer_rule: AnswerRule = AnswerRule.multi
    chunk_size: int = 64  # items per saved chunk of samples: a killed evaluation resumes at the first unfinished one
    livecodebench: LiveCodeBenchSettings = field(default_factory=LiveCodeBenchSettings)


@dataclass
class CodeVerifyConfig:
    """Running model-written code against test cases (``sandlab.verification``), for the data stages
    (``data.agreement.mode=tests``), the GRPO code reward and the code benchmarks alike."""

    timeout_s: float = 6.0  # wall-clock limit per test (LiveCodeBench's 6 s); CPU time is capped a little above it
    memory_mb: int = 1024  # address-space limit of the untrusted process
    # Parallel sandboxes; None: the CPUs this process may use (its affinity), shared among LOCAL_WORLD_SIZE ranks.
    workers: Optional[int] = None
    # bubblewrap is required; True runs code with resource limits only (a machine without user
    # namespaces). Every report then says the code ran unsandboxed.
    allow_unsandboxed: bool = False
    # Interpreter inside the sandbox; None: /usr/bin/python3 when present, else this Python's base install.
    python: Optional[str] = None


@dataclass
class WandbConfig:
    project: str = "sandlab"
    name: Optional[str] = None  # None: <recipe>-<run dir name>
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; None: online if WANDB_API_KEY is set, else offline
    job_type: Optional[str] = None  # None: from the stages the process runs (data | train | grpo | eval | pipeline)


@dataclass
class ClusterConfig:
    """Where jobs run (recipes/cluster/<name>.yaml): everything site-specific, so templates stay generic."""

    name: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 0
    gpu_type: Optional[str] = None  # a key of sandlab.train.throughput.PEAK_TFLOPS, e.g. "H100 SXM", "MI300X"
    gpu_memory_gb: Optional[float] = None  # per GPU, GiB; None: from gpu_type (sandlab.launch.memory.GPU_MEMORY_GIB)
    peak_tflops: Optional[float] = None  # dense bf16 per GPU; None: from gpu_type
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. "0" (all of the node's memory) or "512G"; None: the cluster default
    container_image: Optional[str] = None  # pyxis/enroot: srun --container-image
    container_mounts: Optional[str] = None
    modules: list[str] = field(default_factory=list)  # `module load` each
    setup: list[str] = field(default_factory=list)  # shell lines run first in every job (env activation, exports)
    python: str = ".venv/bin/python"  # relative to the repository, or absolute
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH` lines, e.g. "--constraint=h100"
    env: dict[str, str] = field(default_factory=dict)  # exported in every job (never secrets: those stay in the submitting shell)


@dataclass
class JobResources:
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # None: the cluster's gpus_per_node
    time: str = "04:00:00"
    cpus_per_task: Optional[int] = None  # None: the cluster's


@dataclass
class ServeSettings:
    """Teacher behind vLLM servers in their own job; data jobs read the endpoints they write."""

    enabled: bool = False
    replicas: int = 1  # one server per node
    port: int = 8000
    resources: JobResources = field(default_factory=lambda: JobResources(time="24:00:00"))
    extra_args: list[str] = field(default_factory=list)  # appended to the vLLM server command line
    # The data jobs that only send requests to the servers: a few CPUs, no GPUs, no --mem.
    client: JobResources = field(default_factory=lambda: JobResources(gpus_per_node=0, cpus_per_task=8, time="24:00:00"))
    client_partition: Optional[str] = None  # e.g. a CPU partition; None: the cluster's


@dataclass
class CostAssumptions:
    """What the dry-run GPU-hour estimate assumes where the run has not produced data yet."""

    train_mfu: float = 0.40  # model FLOPs utilization of training
    inference_mfu: float = 0.05  # of decoding (memory-bound: a few percent of peak is typical)
    kept_fraction: float = 0.3  # of generated problems that survive agreement/dedup/decontam (SAND: ~0.3)
    output_fill: float = 0.5  # mean generated tokens / max_tokens
    mean_train_tokens: int = 8000  # per training example (prompt + reasoning trace)
    # Examples of a training set that cannot be counted here (a Hub dataset); None: from num_problems.
    train_examples: Optional[int] = None

    def __post_init__(self) -> None:
        if not (0 < self.train_mfu <= 1 and 0 < self.inference_mfu <= 1 and 0 < self.output_fill <= 1 and 0 < self.kept_fraction <= 1):
            raise ConfigError("launcher.cost: train_mfu, inference_mfu, output_fill and kept_fraction must be in (0, 1]")


@dataclass
class LauncherConfig:
    """Per-recipe Slurm resources, one entry per kind of job (sandlab-submit); the cluster config
    says where they run."""

    name: str = "local"
    data: JobResources = field(default_factory=JobResources)
    train: JobResources = field(default_factory=JobResources)
    eval: JobResources = field(default_factory=JobResources)
    serve: ServeSettings = field(default_factory=ServeSettings)
    requeue: bool = True  # requeue on preemption/time limit; the job resumes from what it finished
    signal_grace_s: int = 300  # Slurm signals the job this long before its time limit, and it requeues itself
    cost: CostAssumptions = field(default_factory=CostAssumptions)


@dataclass
class RunSettings:
    dir: str = "runs/${recipe}"
    seed: int = 0
    # Run only these of the recipe's stages (a Slurm job runs its share); None: all of them.
    only: Optional[list[str]] = None


@dataclass
class RecipeConfig:
    recipe: str = "recipe"
    description: str = ""
    stages: list[str] = field(default_factory=lambda: ["generate", "solve", "filter", "dedup", "decontam", "diversity", "export", "train", "eval", "report"])
    # Standalone data stage: `python data_gen/run.py stage=<stage> input=<file.jsonl> output=<dir>`.
    stage: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: BackendConfig = field(default_factory=BackendConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    verify: CodeVerifyConfig = field(default_factory=CodeVerifyConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

BACKENDS = tuple(b.value for b in Backend)


def job_setup_lines(key: str = "cluster", *, _root_: Any = None) -> list[str]:
    """Shell lines that prepare a job on the cluster config at ``key`` (modules, setup, env), for
    launchers that take a list of lines (hydra/launcher=sandlab_slurm). Hydra evaluates this once
    while it composes the launcher, before the cluster config is merged: that yields no lines."""
    import shlex  # noqa: PLC0415

    cluster = OmegaConf.select(_root_, key, default=None) if _root_ is not None else None
    if cluster is None:
        return []
    lines = [f"module load {m}" for m in cluster.get("modules") or []]
    lines += list(cluster.get("setup") or [])
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in (cluster.get("env") or {}).items()]
    return lines


def register_schema() -> None:
    """Make the schema the base of every recipe (recipes/base.yaml lists it first), so Hydra knows
    every field: any of them can be overridden from the command line and types are checked at compose."""
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415

    ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)
    # For the submitit launcher config: Slurm wants no --gpus-per-node at all on CPU partitions.
    OmegaConf.register_new_resolver("sandlab.gpus_or_none", lambda n: int(n) or None, replace=True)
    OmegaConf.register_new_resolver("sandlab.job_setup", job_setup_lines, replace=True)


register_schema()


def validate_recipe(cfg: DictConfig) -> RecipeConfig:
    """Merge the composed config into the schema and check cross-field rules; raise ConfigError.
    The stage lists are checked against the stage registry by ``sandlab.stages.load_recipe``."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), plain)
        recipe: RecipeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"invalid recipe value{f' at {key}' if key else ''}: {msg}") from None
    for where, backend in (("teacher", recipe.teacher), ("eval.backend", recipe.eval.backend), ("data.passrate.student", recipe.data.passrate.student)):
        if backend.backend == "openai" and not backend.base_urls and not backend.endpoints_file:
            raise ConfigError(f"{where}.backend=openai needs {where}.base_urls=[http://host:port/v1, ...] or {where}.endpoints_file")
    # Choices (Choice fields) fail at compose; single-section ranges and the global batch in __post_init__.
    if "grpo" in recipe.stages:
        if "train" not in recipe.stages and not recipe.rl.init_from:
            raise ConfigError("GRPO starts from an SFT checkpoint: set rl.init_from=<sft run>/checkpoints/final (or add the train stage)")
        if not recipe.rl.stages:
            raise ConfigError("rl.stages is empty; give at least one GRPO stage")
        r = recipe.rl
        if (r.per_device_train_batch_size * r.num_processes * r.gradient_accumulation_steps) % r.num_generations:
            raise ConfigError(f"rl: per_device_train_batch_size x num_processes x gradient_accumulation_steps must be a multiple of num_generations={r.num_generations}")
    if recipe.data.generate.style == GenerationStyle.general and recipe.data.agreement.mode != AgreementMode.single and "filter" in recipe.stages:
        raise ConfigError("data.generate.style=general has no answers to agree on; set data.agreement.mode=single")
    # Jobs render cluster.env and cluster.setup into their scripts, and W&B records the cluster config.
    exported = [k for k in recipe.cluster.env] + [m.group(1) for line in recipe.cluster.setup for m in [re.match(r"\s*export\s+(\w+)=", line)] if m]
    secret = [k for k in exported if SECRET_KEY_RE.search(k)]
    if secret:
        raise ConfigError(f"cluster sets {secret[0]}, which looks like a secret: export it in the submitting shell instead "
                          "(sbatch passes the environment on), so it is never written into scripts, configs or W&B")
    return recipe
