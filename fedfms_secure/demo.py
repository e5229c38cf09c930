"""``fedfms-secure demo``: a whole secure federation on loopback, then a report.

In order: synthetic NIfTI sites in the MSD layout (or ``--data``), keys provisioned in a temporary
folder (certificates and envelope keys, no CKKS secret key), one server process, the CKKS secret
key generated at the first site (``keys he-init``) and sealed to the others, and one process per
site on 127.0.0.1 under mutual TLS, DP-SGD at each
site, CKKS aggregation at the server, a live progress line, a per-round table, ``OUT/report.json``
and ``OUT/report.png``.

The report reads each site's scores from that site's own state folder (``OUT/run/SITE/metrics.jsonl``):
the demo runs every party on this one machine. The server's folder gives only what the server
knows (who reported each round, bytes, round times).

With ``--holdout SITE`` (leave-one-site-out, as in FedFMS) that site starts no client and never
trains; at the end ``fedfms-secure evaluate --split all`` scores the final global model (which a site keeps in
``STATE/final_model.pt``) on all of its slices, and the report gives that result separately.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfms_secure.data.labels import num_classes_of
from fedfms_secure.errors import ConfigError, FedFmsError
from fedfms_secure.statelock import PRIVATE_UMASK


# generated data and batch size per model: (volume shape, (fewest, most) volumes a site, expected
# patients per DP-SGD step). "tiny": about half of a site's ~170 training patients per step, 3 steps
# an epoch (fewer, larger steps: less noise per patient). "sam" (vit_b/l/h, where one image costs
# seconds on a CPU): 12 patients a site, 9 of them training, 3 steps of 4 an epoch, ~10 validation
# slices, so that a vit_b round at 128 px fits in minutes on 2 CPU cores.
DEMO_DATA: dict[str, tuple[tuple[int, int, int], tuple[int, int], int]] = {
    "tiny": ((64, 64, 8), (200, 240), 80),
    "sam": ((64, 64, 6), (12, 12), 4),
}


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("demo-out")
    clients: int = 3
    rounds: int = 5
    epsilon: float = 8.0
    he: bool = True
    mode: str = "fedmsa"
    data: Path | None = None
    preset: str = "tiny"
    seed: int = 0
    local_epochs: int = 5
    # None: the server's default plan (ServerConfig.learning_rate)
    learning_rate: float | None = None
    # model input side in pixels (None: the preset's, 64 for tiny and 1024 for SAM's own)
    image_size: int | None = None
    # where each site trains: auto (a CUDA GPU when present), cpu, cuda, cuda:N
    device: str = "auto"
    # (H, W, slices) of each generated volume (None: per preset, see DEMO_DATA): many small volumes
    # (about 4-5 slices kept each), since patient-level DP-SGD needs many patients per site
    synth_shape: tuple[int, int, int] | None = None
    # (fewest, most) volumes of a generated site (None: per preset)
    synth_volumes: tuple[int, int] | None = None
    # expected patients per DP-SGD step, the plan's batch size (None: per preset)
    batch_size: int | None = None
    # what one DP record is: "patient" (default) or "slice" (does not protect patients)
    privacy_unit: str = "patient"
    # the sites' privacy accountant: "rdp" (default) or "prv" (tighter: less noise for the same epsilon)
    accountant: str = "rdp"
    # patient-level DP: slices of a sampled patient averaged before clipping
    slices_per_patient: int = 1
    timeout: float = 1800.0
    pretrained: bool = True
    # keep each site's per-round delta, weight and decrypted aggregate (STATE/updates) for audits
    save_updates: bool = False
    # leave-one-site-out: this site never trains and is scored at the end (with generated data,
    # one more site is generated so that `clients` sites still train)
    holdout: str | None = None
    # how the sites read their folders (see fedfms_secure.data)
    labels: str | None = None
    axis: int = 2
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    keep_empty_every: int = 5
    skip_bad: bool = False
    # the CKKS quantisation: None sizes it from the plan (lr, local steps, DP noise; he/quantplan.py),
    # with local_steps counted from the sites' training splits unless given; quant_bits (with
    # update_bound, default 1) fixes it instead, as provisioning did before the plan sized it
    local_steps: int | None = None
    quant_bits: int | None = None
    update_bound: float | None = None

    def __post_init__(self) -> None:
        """Every option is checked here, before any data is written or any process started: the
        settings the demo shares with the daemons by the daemons' own checks."""
        from fedfms_secure.config import ClientConfig, ServerConfig

        shape, volumes, batch = DEMO_DATA["tiny" if self.preset == "tiny" else "sam"]
        for name, value in (("synth_shape", shape), ("synth_volumes", volumes), ("batch_size", batch)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.clients < 1:
            raise ConfigError(f"--clients must be at least 1, not {self.clients}")
        if not self.timeout > 0:
            raise ConfigError(f"the demo's timeout must be a positive number of seconds, not {self.timeout}")
        if self.holdout is not None and not self.holdout.strip():
            raise ConfigError("--holdout needs the name of one of the sites")
        if self.data is not None and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data} is not a folder: give a folder of site folders")
        unset = Path("-")  # the demo provisions the keys and state folders itself
        ServerConfig(keys=unset, state=unset, rounds=self.rounds, mode=self.mode, preset=self.preset, seed=self.seed,
                     image_size=self.image_size, batch_size=self.batch_size,
                     local_epochs=self.local_epochs, he=self.he, pretrained=self.pretrained,
                     num_classes=num_classes_of(self.labels),
                     **({} if self.learning_rate is None else {"learning_rate": self.learning_rate}))
        ClientConfig(keys=unset, data=unset, state=unset, epsilon=self.epsilon, accountant=self.accountant,
                     slices_per_patient=self.slices_per_patient,
                     privacy_unit=self.privacy_unit, labels=self.labels, axis=self.axis,
                     clip_percentiles=self.clip_percentiles, keep_empty_every=self.keep_empty_every,
                     skip_bad=self.skip_bad, device=self.device)


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """Runs the demo and returns the report (also written to ``OUT/report.json``).

    Everything it writes (patient data, state folders, bundles, report) is private to its user:
    folders 0700 and files 0600, as the daemons write theirs."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        return _run_demo(options, console)
    finally:
        os.umask(previous)


def _run_demo(options: DemoOptions, console: Console | None) -> dict[str, Any]:
    from fedfms_secure.keys.export import export_bundle
    from fedfms_secure.keys.provision import init_federation
    from fedfms_secure.data import find_sites, synth_federation
    from fedfms_secure.report import build_report, plot_report, worse_than_start  # opacus and torch: not for `--help`

    console = console or Console(stderr=True)
    if options.clients < 1 or options.rounds < 1:
        raise ConfigError("--clients and --rounds must be at least 1")
    out = options.out
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    extra = 1 if options.holdout else 0
    if options.data is None:
        data_dir = out / "data"
        shutil.rmtree(data_dir, ignore_errors=True)
        sites = synth_federation(data_dir, sites=options.clients + extra, seed=options.seed, shape=options.synth_shape,
                                 volumes=options.synth_volumes)
        console.print(f"[1/5] wrote {len(sites)} synthetic NIfTI sites (MSD layout) to {data_dir}")
    else:
        sites = find_sites(options.data)
        console.print(f"[1/5] using site folders from {options.data}")
    held_out = None
    if options.holdout:
        held_out = next((site for site in sites if site.name == options.holdout), None)
        if held_out is None:
            raise ConfigError(f"--holdout {options.holdout!r} is not one of the sites: "
                              f"{', '.join(site.name for site in sites)}")
        sites = [site for site in sites if site != held_out]
    if len(sites) < options.clients:
        raise ConfigError(
            f"{options.data or out / 'data'} holds {len(sites)} training site folder(s) but --clients is "
            f"{options.clients}: lower --clients or add sites"
        )
    sites = sites[: options.clients]
    names = [site.name for site in sites]
    if held_out is not None:
        console.print(f"      training sites: {', '.join(names)}; held out (never trains): {held_out.name}")

    with tempfile.TemporaryDirectory(prefix="fedfms-keys-") as tmp:
        params = _ckks_params(options, sites, run_dir)
        # no CKKS secret key here: one site makes it (keys he-init) once the server runs
        provision = init_federation(Path(tmp) / "provision", federation="demo", server_host="localhost",
                                    clients=names, params=params, he_dealer=False)
        bundles = run_dir / "bundles"
        export_bundle("server", None, provision, bundles / "server")
        for name in names:
            export_bundle("client", name, provision, bundles / name)
        console.print(f"[2/5] provisioned CA, mTLS certificates, envelope keys and CKKS parameters for {len(names)} "
                      "sites (the server bundle holds no CKKS secret key)")
        # the provisioning folder (with the CA key) is deleted here; each party keeps only its bundle

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    server_state = run_dir / "server"
    cmd = [sys.executable, "-m", "fedfms_secure", "server", "--keys", str(bundles / "server"),
           "--address", "127.0.0.1:0", "--state", str(server_state), "--rounds", str(options.rounds),
           "--mode", options.mode, "--preset", options.preset, "--seed", str(options.seed),
           "--local-epochs", str(options.local_epochs), "--num-classes", str(num_classes_of(options.labels)),
           "--batch-size", str(options.batch_size),
           *(["--image-size", str(options.image_size)] if options.image_size else []),
           "--exit-when-done", *(["--lr", repr(options.learning_rate)] if options.learning_rate is not None else [])]
    if not options.he:
        cmd.append("--no-he")
    if not options.pretrained:
        cmd.append("--no-pretrained")
    procs: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    # a SIGTERM to the demo unwinds through `finally`, so no server or site is left behind
    in_main = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_exit) if in_main else None
    try:
        procs["server"] = _spawn(cmd, logs / "server.log", env)
        address = _wait_for_address(server_state, procs["server"], logs / "server.log")
        console.print(f"[3/5] server on {address} (mutual TLS)")
        if options.he:
            made = _he_init(bundles / names[0], address, logs / "he-init.log", env)
            console.print(f"      the CKKS secret key was generated at site {made['site']} and sealed to each site "
                          f"({', '.join(made['recipients']) or 'no other site'}); the server relays the envelopes "
                          "and cannot open them")
        console.print(f"      starting {len(names)} site processes")
        for name, site in zip(names, sites):
            procs[name] = _spawn(
                [sys.executable, "-m", "fedfms_secure", "client", "--keys", str(bundles / name),
                 "--server", address, "--data", str(site), "--state", str(run_dir / name),
                 "--epsilon", str(options.epsilon), "--privacy-unit", options.privacy_unit,
                 "--accountant", options.accountant, "--slices-per-patient", str(options.slices_per_patient),
                 "--device", options.device,
                 *(["--save-updates"] if options.save_updates else []),
                 *_data_flags(options)],
                logs / f"{name}.log",
                env,
            )
        _follow(procs, server_state, options, logs, console)
    finally:
        _stop_all(procs)
        if in_main:
            signal.signal(signal.SIGTERM, previous_handler)
    holdout = None
    if held_out is not None:
        holdout = _evaluate_holdout(run_dir / names[0] / "final_model.pt", held_out, options, logs, env)
    report = build_report(server_state, {n: run_dir / n for n in names}, asdict(options), time.monotonic() - started,
                          holdout=holdout)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_report(report, out / "report.png")
    console.print(_table(report))
    worse = worse_than_start(report)
    if worse:
        console.print(f"[bold red]warning:[/] {worse}")
    if holdout is not None:
        console.print(f"held-out site {holdout['name']} (never trained), final global model on all its "
                      f"{holdout['slices']} slices: Dice {_pm(holdout['dice_mean'], holdout['dice_std'])}, IoU "
                      f"{_pm(holdout['iou_mean'], holdout['iou_std'])}, HD95 "
                      f"{_pm(holdout['hd95_mean'], holdout['hd95_std'], 1)} px")
    finals = [run_dir / n / "final_model.pt" for n in names if (run_dir / n / "final_model.pt").is_file()]
    if finals:
        console.print(f"final global model (the same at every site): {', '.join(str(p) for p in finals)}\n"
                      f"      segment new scans with: fedfms-secure predict --model {finals[0]} --input SCANS "
                      "--out MASKS")
    console.print(f"[5/5] wrote {out / 'report.json'} and {out / 'report.png'}; logs in {logs}")
    return report


def _data_flags(options: DemoOptions) -> list[str]:
    """The client flags that say how a site folder is read."""
    low, high = options.clip_percentiles
    flags = ["--axis", str(options.axis), "--clip-percentiles", f"{low:g},{high:g}",
             "--keep-empty-every", str(options.keep_empty_every)]
    if options.labels:
        flags += ["--labels", options.labels]
    if options.skip_bad:
        flags.append("--skip-bad")
    return flags


def _evaluate_holdout(model: Path, site: Path, options: DemoOptions, logs: Path,
                      env: dict[str, str]) -> dict[str, Any]:
    """``fedfms-secure evaluate`` of the final global model on the held-out site (all its slices)."""
    cmd = [sys.executable, "-m", "fedfms_secure", "evaluate", "--model", str(model), "--data", str(site), "--split", "all",
           "--json", "--device", options.device]
    if options.skip_bad:
        cmd.append("--skip-bad")
    log_file = logs / "evaluate.log"
    with open(log_file, "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, timeout=options.timeout)
    if done.returncode != 0:
        raise FedFmsError(f"evaluating the held-out site {site.name} failed (exit {done.returncode}):\n{_tail(log_file)}")
    result = json.loads(done.stdout)
    return {**result["sites"][0], "model": str(model)}


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None or not math.isfinite(std) else f" ± {std:.{digits}f}")


def _he_init(bundle: Path, address: str, log_file: Path, env: dict[str, str], timeout: float = 300.0) -> dict[str, Any]:
    """``fedfms-secure keys he-init`` at one site: returns its JSON report (epoch, site, recipients)."""
    cmd = [sys.executable, "-m", "fedfms_secure", "keys", "he-init", "--keys", str(bundle), "--server", address,
           "--json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedFmsError(f"keys he-init did not finish within {timeout:.0f} s; see {log_file}") from None
    log_file.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise FedFmsError(f"keys he-init failed (exit {done.returncode}):\n{_tail(log_file)}")
    return json.loads(done.stdout)


def _spawn(cmd: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_file, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


def _stop_all(procs: dict[str, subprocess.Popen]) -> None:
    """Terminates every child still running, then kills whichever ignores that."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ckks_params(options: DemoOptions, sites: list[Path], run_dir: Path) -> Any:
    """The federation's CKKS parameters: from the update plan (bound lr x steps, step sized to the
    DP noise), or the fixed ``quant_bits`` / ``update_bound`` of the options."""
    from fedfms_secure.config import ServerConfig
    from fedfms_secure.he.packing import DEFAULT_UPDATE_BOUND, fit_params
    from fedfms_secure.he.quantplan import UpdatePlan, plan_params

    if options.quant_bits is not None:
        bound = DEFAULT_UPDATE_BOUND if options.update_bound is None else options.update_bound
        return fit_params(bound=bound, sites=len(sites), rounds=options.rounds, quant_bits=options.quant_bits)
    unset = Path("-")
    server = ServerConfig(keys=unset, state=unset, rounds=options.rounds, local_epochs=options.local_epochs,
                          batch_size=options.batch_size,
                          **({} if options.learning_rate is None else {"learning_rate": options.learning_rate}))
    if options.local_steps is not None:
        fewest = most = options.local_steps
    else:
        fewest, most = _local_steps(sites, options, server.batch_size, run_dir)
    plan = UpdatePlan(lr=server.learning_rate, local_steps=most, min_local_steps=fewest, sites=len(sites),
                      rounds=options.rounds, dp=math.isfinite(options.epsilon), bound=options.update_bound)
    return plan_params(plan)


def _local_steps(sites: list[Path], options: DemoOptions, batch_size: int, run_dir: Path) -> tuple[int, int]:
    """Optimizer steps in one round of the least and of the busiest site, counted as the sites will
    count them (under DP from their records, patients by default: ``privacy.planning``; without DP
    from their slices): each site's training split is loaded into the cache (and split file) it
    then reuses."""
    from fedfms_secure.data.loader import load_site
    from fedfms_secure.model.registry import get_preset
    from fedfms_secure.privacy.planning import plan_records
    from fedfms_secure.train.local import steps_per_epoch

    image_size = get_preset(options.preset).img_size
    counts = []
    for site in sites:
        state = run_dir / site.name
        state.mkdir(parents=True, exist_ok=True)
        data = load_site(site, image_size=image_size, split_file=state / "split.json", seed=options.seed,
                         axis=options.axis, keep_empty_every=options.keep_empty_every, skip_bad=options.skip_bad,
                         labels=options.labels, clip_percentiles=options.clip_percentiles, cache_dir=state / "cache")
        records = plan_records(data.train, unit=options.privacy_unit, batch_size=batch_size)
        if math.isfinite(options.epsilon):
            per_epoch = records.steps_per_epoch
        else:
            per_epoch = steps_per_epoch(len(data.train), records.expected_per_step)
        counts.append(options.local_epochs * per_epoch)
    return min(counts), max(counts)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_for_address(state: Path, proc: subprocess.Popen, log_file: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = state / "address.json"
        if path.exists():
            return json.loads(path.read_text())["address"]
        if proc.poll() is not None:
            raise FedFmsError(f"the server exited during start-up:\n{_tail(log_file)}")
        time.sleep(0.2)
    raise FedFmsError(f"the server did not start within {timeout:.0f} s; see {log_file}")


def _follow(procs: dict[str, subprocess.Popen], state: Path, options: DemoOptions, logs: Path,
            console: Console) -> None:
    """Shows progress until the server exits; any process failing stops the demo with its log."""
    deadline = time.monotonic() + options.timeout
    with Progress(TextColumn("[4/5] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("federating", total=options.rounds)
        while procs["server"].poll() is None:
            for name, proc in procs.items():
                if name != "server" and proc.returncode is None and proc.poll() not in (None, 0):
                    raise FedFmsError(f"site {name} failed (exit {proc.returncode}):\n{_tail(logs / f'{name}.log')}")
            status = _read_json(state / "status.json")
            if status:
                done_rounds = min(status["round"], options.rounds)
                progress.update(task, completed=done_rounds,
                                description=f"round {min(status['round'] + 1, options.rounds)}: {status['phase']}")
            if time.monotonic() > deadline:
                raise FedFmsError(f"the demo did not finish within {options.timeout:.0f} s; see the logs in {logs}")
            time.sleep(0.3)
        progress.update(task, completed=options.rounds, description="done")
    if procs["server"].returncode != 0:
        raise FedFmsError(f"the server failed (exit {procs['server'].returncode}):\n{_tail(logs / 'server.log')}")
    for name, proc in procs.items():
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise FedFmsError(f"site {name} did not finish; see {logs / f'{name}.log'}") from None
        if code != 0:
            raise FedFmsError(f"{name} failed (exit {code}):\n{_tail(logs / f'{name}.log')}")


def _table(report: dict[str, Any]) -> Table:
    sites = report["sites"]
    unit = report["options"].get("privacy_unit", "patient")
    table = Table(title=f"fedfms-secure demo: {report['options']['mode']}, "
                        f"{'CKKS' if report['options']['he'] else 'plaintext'} aggregation, "
                        f"target epsilon {report['options']['epsilon']} per "
                        f"{'patient' if unit == 'patient' else 'SLICE (does not protect patients)'}",
                  caption="Dice: global model on the sites' validation slices; eps: spent so far; "
                          "bytes: all sites together")
    per_site = len(sites) <= 3  # wider federations show the largest epsilon only (report.json has all)
    eps_headers = [f"eps\n{name}" for name in sites] if per_site else ["eps\n(max)"]
    for header in ("round", "Dice", *eps_headers, "bytes\nup", "bytes\ndown", "s"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_row("start", f"{report['dice_initial']:.4f}", *["0" for _ in eps_headers], "-", "-", "-")
    for row in report["rounds"]:
        eps = [_fmt_eps(row["epsilon"].get(name)) for name in sites] if per_site else [_fmt_eps(row["epsilon_max"])]
        table.add_row(str(row["round"]), f"{row['dice_mean']:.4f}", *eps, _fmt_bytes(row["bytes_up_total"]),
                      _fmt_bytes(row["bytes_down_total"]), f"{row['seconds']:.1f}")
    return table


def _fmt_eps(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
