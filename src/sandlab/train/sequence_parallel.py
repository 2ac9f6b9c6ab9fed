"""DeepSpeed Ulysses sequence parallelism through accelerate's ParallelismConfig (``train.sequence_parallel_size``).

The supported path does the work: sandlab writes ``parallelism_config`` (sp_backend deepspeed) into the
run's accelerate config (``sandlab.train.launcher.write_accelerate_config``); accelerate wraps the
training dataloader in DeepSpeed's ``UlyssesSPDataLoaderAdapter`` and the attention in
``UlyssesSPAttentionHF``; the Trainer shards each batch along the sequence and TRL adds position_ids
and reduces the loss over the group. Rows are padded to a multiple of the degree (to max_length on
CPU, where gloo cannot all-gather rows of different lengths).

Two gaps are bridged here, so that a killed SP job resumes to the weights of an uninterrupted one:

* on resume, transformers 5.19's Trainer skips the batches already trained with accelerate's
  ``skip_first_batches``, which reads ``.dataset`` and ``.batch_sampler`` off the dataloader; DeepSpeed
  0.19's adapter has neither. ``resumable_skip`` skips on the dataloader the adapter wraps (one inner
  batch per ``sp`` adapter steps) and re-wraps it;
* the adapter has no ``set_epoch``, so the epoch order of the wrapped dataloader follows how many times
  it was iterated; after a resume the next epoch would replay the first one's order. ``set_epoch``
  forwards the Trainer's epoch to the wrapped dataloader (a no-op when it is already there, as in an
  uninterrupted run).
"""

from __future__ import annotations


def resumable_skip(skip_first_batches):
    """``skip_first_batches`` that also takes DeepSpeed's Ulysses dataloader adapter."""

    def skip(dataloader, num_batches: int = 0):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter  # noqa: PLC0415

        if not isinstance(dataloader, UlyssesSPDataLoaderAdapter):
            return skip_first_batches(dataloader, num_batches)
        sp = dataloader.sp_world_size
        inner = skip_first_batches(dataloader.dl, num_batches // sp)  # each inner batch is sp adapter steps
        adapter = UlyssesSPDataLoaderAdapter(inner, dataloader.sp_rank, dataloader.sp_group, sp, dataloader.device)
        for _ in range(num_batches % sp):  # every rank takes the same steps: the adapter's gathers stay matched
            next(adapter)
        return adapter

    skip.sandlab_sequence_parallel = True
    return skip


def _set_epoch(adapter, epoch: int) -> None:
    inner = adapter.dl
    if getattr(inner, "iteration", epoch) != epoch and hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)
        adapter.iter = iter(inner)  # an iterator made for another epoch would replay that epoch's order
        adapter.micro_batches.clear()


def enable_resume() -> None:
    """Let the Trainer resume a sequence-parallel run mid-epoch and see the same epochs (idempotent)."""
    import transformers.trainer as trainer_module  # noqa: PLC0415
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter  # noqa: PLC0415

    if not getattr(trainer_module.skip_first_batches, "sandlab_sequence_parallel", False):
        trainer_module.skip_first_batches = resumable_skip(trainer_module.skip_first_batches)
    if not hasattr(UlyssesSPDataLoaderAdapter, "set_epoch"):
        UlyssesSPDataLoaderAdapter.set_epoch = _set_epoch
