"""The `kubetune` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kubetune import __version__
from kubetune.api.plan import PlanDocument


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
def main() -> None:
    """kubetune: fine-tune LLMs on Kubernetes with the method, memory and stopping decided
    for you. Run `kubetune COMMAND --help` for each command."""


@main.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--nproc",
    type=int,
    default=None,
    help="Training processes (DeepSpeed over gloo on CPU; one per GPU with CUDA). "
    "Default: the spec's resources.processesPerNode, else 1.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory (default: spec.output file:// path or ./kubetune-output/NAME).",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Port for rank 0's /metrics on 127.0.0.1 (default: a free one).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Show everything the trainer's libraries print (and HF's per-step logs) here "
    "instead of only in OUTPUT/logs/run.log.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print nothing but errors (for scripts); the exit code says how the run ended.",
)
def run(
    job: Path,
    nproc: int | None,
    output: Path | None,
    metrics_port: int | None,
    verbose: bool,
    quiet: bool,
) -> None:
    """Run a FineTuneJob file on this machine: plan, train, report. The same file runs on
    a cluster with `kubectl apply -f`.

    In a terminal a progress bar shows the run, with one line per evaluation (eval loss,
    gap, perplexity, token accuracy, memorisation, general-text ratio and the early-stop
    policy's verdict) and Auto's decisions as they happen; without one, plain lines (a
    progress line at most every 30 s). The libraries' output goes to OUTPUT/logs/run.log."""
    from kubetune.data import DataError
    from kubetune.local_inputs import InputError
    from kubetune.local_run import EXIT_INTERRUPTED, execute, log_tail, prepare_local_run
    from kubetune.planning import ModelConfigError
    from kubetune.run_display import make_display

    spec = _load_job(job).spec  # spec errors first, with the file name
    if nproc is None:
        nproc = spec.resources.processes_per_node or 1
    if nproc < 1:
        raise click.BadParameter("must be at least 1", param_hint="--nproc")
    if verbose and quiet:
        raise click.BadParameter("--verbose and --quiet exclude each other", param_hint="--quiet")
    echo = (lambda _text: None) if quiet else click.echo
    try:
        local = prepare_local_run(
            job, nproc, output, metrics_port, say=(lambda _t: None) if quiet else None
        )
    except (InputError, DataError, ModelConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    echo(_plan_table(local.plan))
    if not local.plan.fits:
        raise click.ClickException("the plan does not fit on this machine")
    echo(
        f"\ntraining with {nproc} process(es); output in {local.output}; metrics on "
        f"http://127.0.0.1:{local.env['KUBETUNE_METRICS_PORT']}/metrics"
    )
    echo(
        "library output: shown here (--verbose)\n"
        if verbose
        else f"library output: {local.log_path} (--verbose shows it here)\n"
    )
    display = make_display(
        quiet=quiet, terminal=not verbose and sys.stdout.isatty(), stream=sys.stdout
    )
    errors: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("kind") == "error":
            errors.append(str(event.get("text") or ""))
        display.event(event)

    try:
        code = execute(local, on_event, verbose=verbose)
    finally:
        display.close()
    if code == EXIT_INTERRUPTED:
        click.echo(
            f"\ninterrupted; `kubetune run {job}` again resumes from the newest checkpoint "
            f"in {local.output / 'checkpoints'}",
            err=True,
        )
        sys.exit(code)
    if code != 0:
        if quiet:
            for text in errors:
                click.echo(f"error: {text}", err=True)
        if not verbose:
            tail = log_tail(local.log_path)
            click.echo(
                f"\nthe trainer exited with {code}; the last lines of {local.log_path}:\n{tail}",
                err=True,
            )
        sys.exit(code)
    report = local.output / "report.md"
    if report.exists():
        # Its summary, figures and warnings (some come up only in training); the reasons
        # were printed with the plan.
        echo("\n" + _report_summary(report.read_text()) + "\n")
        echo(
            f"report: {report}  (JSON: {local.output / 'report.json'}, "
            f"curve: {local.output / 'loss.png'})"
        )
    sys.exit(code)


def _report_summary(text: str) -> str:
    """report.md without its "Why this plan" and cost sections: the head, the figures and
    the warnings."""
    head, *sections = text.split("\n## ")
    kept = [head.rstrip()] + [
        "## " + section.rstrip() for section in sections if section.startswith("Warnings")
    ]
    return "\n\n".join(kept)


def _load_job(job: Path) -> Any:
    from kubetune.api import SpecError, job_from_yaml_file

    try:
        return job_from_yaml_file(job)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
@click.option(
    "--gpu-memory-gib",
    type=float,
    default=None,
    help="GPU memory per device when the spec does not say (default 80).",
)
def plan(job: Path, output: str, gpu_memory_gib: float | None) -> None:
    """Print the plan for a FineTuneJob: method, ZeRO stage, memory, hyperparameters and the
    reasons, from the model's config.json and the dataset, with no GPU and no cluster.
    Exits 1 when the plan does not fit."""
    import yaml

    from kubetune.data import DataError
    from kubetune.local_inputs import (
        InputError,
        config_maps_in,
        local_dataset,
        local_sources,
        read_model_config,
        s3_settings,
    )
    from kubetune.planning import ModelConfigError
    from kubetune.planning.job import build_plan, resolve_gpu_memory

    spec = _load_job(job).spec
    cms = config_maps_in(job)
    s3 = s3_settings(spec)
    try:
        (train, train_src), val = local_dataset(spec, cms, s3)
        extra = local_sources(spec, cms, s3)
        model = read_model_config(spec.model.uri, cms, s3)
        memory = resolve_gpu_memory(spec, None, gpu_memory_gib or 80.0)
        if gpu_memory_gib and not spec.resources.gpu_memory_gib and spec.resources.gpus_per_node:
            memory = (gpu_memory_gib, f"GPU memory {gpu_memory_gib:g} GiB from --gpu-memory-gib")
        result = build_plan(
            spec,
            train,
            train_src,
            model,
            spec.model.uri,
            memory,
            val[0] if val else None,
            val[1] if val else "",
            extra_sources=extra,
        )
    except (InputError, DataError, ModelConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    if output == "json":
        click.echo(json.dumps(result.to_json(), indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(result.to_json(), sort_keys=False))
    else:
        click.echo(_plan_table(result))
    if not result.fits:
        sys.exit(1)


def _plan_table(p: PlanDocument) -> str:
    mem, hp = p.memory, p.hyperparameters
    lines = [
        f"method            {p.method}" + ("" if p.fits else "   (DOES NOT FIT)"),
        f"deepspeed         ZeRO-{p.zero_stage}, offload {p.offload}",
        f"parameters        {p.trainable_parameters:,} trainable of {p.total_parameters:,}",
        f"memory per GPU    {mem.per_gpu_gib:.1f} GiB of {mem.gpu_memory_gib:.1f}"
        f" (model states {mem.model_states_gib:.1f}, activations "
        f"{mem.activations_gib:.1f}, overhead {mem.overhead_gib:.1f})",
        f"data              {p.example_count:,} examples, {p.token_count:,} tokens"
        + (" (estimated: characters / 4)" if p.token_count_estimated else " (model tokenizer)"),
        f"learning rate     {hp.learning_rate}",
        f"epochs            {hp.epochs}  (total steps {hp.total_steps}, warmup "
        f"{hp.warmup_steps}, eval every {hp.eval_steps})",
        f"batch             micro-batch {hp.micro_batch_size} x accumulation "
        f"{hp.gradient_accumulation_steps}",
        "",
        "reasons:",
        *(f"  - {r}" for r in p.reasons),
    ]
    if p.warnings:
        lines += ["", "warnings:", *(f"  - {w}" for w in p.warnings)]
    return "\n".join(lines)


@main.command()
@click.argument("job", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(job: Path) -> None:
    """Validate a FineTuneJob file and, where it can be read here, its dataset."""
    from kubetune.data import DataError, summarize
    from kubetune.data.mixture import mixed_rows
    from kubetune.data.tokens import find_tokenizer
    from kubetune.local_inputs import (
        InputError,
        config_maps_in,
        local_dataset,
        local_sources,
        s3_settings,
    )
    from kubetune.planning.job import dedup_settings, quality_decisions, quality_note, read_job_data

    spec = _load_job(job).spec
    click.echo(f"{job}: the FineTuneJob spec is valid")
    cms = config_maps_in(job)
    s3 = s3_settings(spec)
    try:
        (raw, src), val = local_dataset(spec, cms, s3)
    except InputError as exc:
        if spec.dataset.uri.startswith(("file://", "s3://", "hf://")):
            raise click.ClickException(str(exc)) from exc
        click.echo(f"dataset not checked: {exc}")
        return
    vraw, vsrc = val or (None, "")
    try:
        fmt, sources, validation = read_job_data(
            spec, raw, src, vraw, vsrc, local_sources(spec, cms, s3)
        )
        examples = [ex for source in sources for ex in source.examples]
        tokenizer, _ = find_tokenizer(spec.model.uri)
        lengths = (
            [n for s in sources for n in tokenizer.example_lengths(s.examples, s.name)]
            if tokenizer
            else None
        )
        summary = summarize(
            examples, src, fmt, validation or [], spec.dataset.max_seq_length, lengths
        )
    except (DataError, InputError) as exc:
        raise click.ClickException(str(exc)) from exc
    how = "estimated" if summary.tokens_estimated else "counted with the model's tokenizer"
    files = f" in {len(sources)} files" if len(sources) > 1 else ""
    click.echo(
        f"{src}: {summary.example_count} {fmt} examples{files}, about "
        f"{summary.token_count:,} tokens ({how})"
    )
    # Duplicates and leakage as the plan finds them (exact and near, spec.dataset.deduplicate),
    # instead of the summary's count of exact duplicates.
    quality = mixed_rows(
        sources,
        validation,
        spec.dataset.validation_split,
        int(spec.hyperparameters.seed),
        dedup_settings(spec),
        vsrc,
    ).quality
    for w in summary.warnings:
        if w not in summary.duplicate_warnings:
            click.echo(f"warning: {w}")
    for d in quality_decisions(quality):
        prefix = "warning: " if d.key == "data.leakage" or quality.kept_duplicates else ""
        click.echo(prefix + d.sentence)
    if quality_note(quality):
        click.echo(quality_note(quality))


@main.command("merge-adapter")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the merged model (default: RUN_DIR/merged).",
)
def merge_adapter_cmd(run_dir: Path, into: Path | None) -> None:
    """Merge the LoRA, DoRA or QLoRA adapter of a finished run (its output directory) into
    the base model's unquantised weights, so the result loads without peft."""
    from kubetune.trainer.config import TrainerConfigError
    from kubetune.trainer.merge import merge_adapter

    try:
        out = merge_adapter(run_dir, into)
    except (TrainerConfigError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"merged model written to {out}")


@main.group("dev-cluster")
def dev_cluster() -> None:
    """A local Kubernetes control plane for development and tests: etcd, kube-apiserver,
    kube-controller-manager, kube-scheduler, kwok with simulated GPU nodes, and a local pod
    runner. Build its binaries first with `make tools`."""


_root_option = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State directory (default: $KUBETUNE_DEV_CLUSTER_DIR or ~/.cache/kubetune/dev-cluster).",
)


@dev_cluster.command("up")
@_root_option
@click.option("--gpu-nodes", default=4, show_default=True, help="Simulated GPU nodes.")
@click.option("--gpus-per-node", default=8, show_default=True, help="nvidia.com/gpu per node.")
@click.option(
    "--gpu-product",
    default="NVIDIA-H100-80GB-HBM3",
    show_default=True,
    help="Value of the nvidia.com/gpu.product label.",
)
@click.option(
    "--gpu-memory-mib",
    default=81559,
    show_default=True,
    help="Value of the nvidia.com/gpu.memory label (MiB).",
)
@click.option("--no-local-runner", is_flag=True, help="Do not start the local pod runner.")
@click.option(
    "--node-image",
    "node_images",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Start a real node too (kubelet, containerd, CNI bridge, CoreDNS, kube-proxy) and "
    "load this image archive into its runtime; repeat for each image (`make images` builds "
    "them; see docs/testing.md). Needs root.",
)
@click.option(
    "--sandbox-image",
    default=None,
    help="Reference of the pause image among --node-image's (containerd's sandbox_image).",
)
@click.option(
    "--kueue",
    is_flag=True,
    help="Also start Kueue (built by `make tools`): its CRDs, controller and webhooks.",
)
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for ready.")
def dev_cluster_up(
    root: Path | None,
    gpu_nodes: int,
    gpus_per_node: int,
    gpu_product: str,
    gpu_memory_mib: int,
    no_local_runner: bool,
    node_images: tuple[Path, ...],
    sandbox_image: str | None,
    kueue: bool,
    timeout: float,
) -> None:
    """Start the cluster and wait until it is ready; prints the KUBECONFIG to use."""
    from kubetune.devcluster.binaries import ToolsMissingError
    from kubetune.devcluster.cluster import ClusterError, DevCluster, NodeImages, default_root
    from kubetune.devcluster.components import GpuNodePool

    real_node = None
    if node_images:
        if not sandbox_image:
            raise click.UsageError(
                "--node-image needs --sandbox-image: the reference of the pause image "
                "(`tools/images.sh --print-refs` prints it as pause=...)"
            )
        real_node = NodeImages(archives=node_images, sandbox_image=sandbox_image)
    elif sandbox_image:
        raise click.UsageError("--sandbox-image is for a real node: give --node-image too")

    pool = GpuNodePool(
        count=gpu_nodes,
        gpus_per_node=gpus_per_node,
        product=gpu_product,
        gpu_memory_mib=gpu_memory_mib,
    )
    cluster = DevCluster(
        root or default_root(),
        gpu_pool=pool,
        local_runner=not no_local_runner,
        real_node=real_node,
        kueue=kueue,
    )
    try:
        cluster.start(timeout=timeout, progress=lambda m: click.echo(f"dev-cluster: {m}"))
    except (ToolsMissingError, ClusterError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"export KUBECONFIG={cluster.layout.kubeconfig}")


@dev_cluster.command("down")
@_root_option
def dev_cluster_down(root: Path | None) -> None:
    """Stop every component of the cluster (its state directory is kept)."""
    from kubetune.devcluster.cluster import DevCluster, default_root

    cluster = DevCluster(root or default_root())
    if not cluster.layout.state_file.exists():
        click.echo(f"dev-cluster: nothing running in {cluster.layout.root}")
        return
    cluster.stop()
    click.echo("dev-cluster: stopped")


@dev_cluster.command("status")
@_root_option
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def dev_cluster_status(root: Path | None, output: str) -> None:
    """Show which components run and whether the API server is ready (exit 1 if not)."""
    from kubetune.devcluster.cluster import DevCluster, default_root

    info = DevCluster(root or default_root()).status()
    if output == "json":
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"state:      {info['root']}")
        click.echo(f"running:    {'yes' if info['running'] else 'no'}")
        for name, state in info.get("components", {}).items():
            click.echo(f"  {name:<24} {state}")
        if info.get("kubeconfig"):
            click.echo(f"kubeconfig: {info['kubeconfig']}")
    sys.exit(0 if info["running"] else 1)


@dev_cluster.command("env")
@_root_option
def dev_cluster_env(root: Path | None) -> None:
    """Print `export KUBECONFIG=...` for the cluster (use with eval)."""
    from kubetune.devcluster.cluster import default_root

    click.echo(f"export KUBECONFIG={(root or default_root()).resolve() / 'kubeconfig'}")


if __name__ == "__main__":
    main()
