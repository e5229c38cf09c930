"""``fedfms-secure client``: one site's side of every round.

For round r the site (see DESIGN.md, "One round")::

    theta_r = theta_0 + Dec(E(theta_r - theta_0))          theta_0 is public: built from the plan's seed
    local DP-SGD on its own patients (one slice each per step) -> theta_k, epsilon so far
    commit E(n_k); wait for E(N); decrypt N
    upload E(n_k / N * (theta_k - theta_r)), chunk by chunk
    wait for the round to close, fetch theta_{r+1}, evaluate it on its validation slices
    keep the scores (Dice, IoU and HD95: mean and standard deviation over its validation images)
    in STATE/metrics.jsonl; tell the server only that it is done: contributed, bytes up and down

After the last round the site keeps the final global model in ``STATE/final_model.pt`` (all its
weights, the class map and the preprocessing; :mod:`fedfms_secure.train.model_file`):
``fedfms-secure evaluate --state STATE`` scores it on this site's validation slices again (the Dice
the site logged), ``--split all`` on any site, e.g. one held out of training, and ``fedfms-secure
predict`` segments new scans with it.

Only the parameters that the mode communicates travel. The sample count n_k never leaves the site
in plaintext, and neither does any update.

The CKKS key: a bundle made without a dealer holds none; the site reads it from ``BUNDLE/he/``
or, at its first start, waits for its sealed envelope (``keys he-init`` at one site) and opens it.
It follows the key epoch the server announces (Join, GetStatus at the start of each round, a
commit refused under an old key) and re-encrypts under a rotated key (``client/hekeys.py``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fedfms_secure.atomic import write_atomic
from fedfms_secure import __version__
from fedfms_secure.config import ClientConfig
from fedfms_secure.logs import add_log_file
from fedfms_secure.statelock import StateLock
from fedfms_secure.site.hekeys import Keyring
from fedfms_secure.he.codec import UpdateCodec, make_site_codec
from fedfms_secure.he.quantplan import clip_to_bound
from fedfms_secure.keys.pki import read_passphrase
from fedfms_secure.keys.bundle import Bundle, load_bundle
from fedfms_secure.data import find_sites, load_site
from fedfms_secure.data.labels import num_classes_of
from fedfms_secure.device import resolve_device
from fedfms_secure.errors import ConfigError, DataError, FederationError, UpdateAlreadyReceived
from fedfms_secure.model.modes import apply_mode
from fedfms_secure.model.registry import build_model
from fedfms_secure.model.vector import flatten, load_vector
from fedfms_secure.privacy import SitePrivacy
from fedfms_secure.privacy.budget import append_ledger
from fedfms_secure.privacy.planning import open_site_privacy, plan_records
from fedfms_secure.privacy.site import check_against_server, check_local_state
from fedfms_secure.protocol import PHASE_UPLOAD, Chunk, Joined, KeyEpoch, Plan, Status, user_round
from fedfms_secure.site.metrics import append_metrics
from fedfms_secure.train.local import TrainConfig, train_local
from fedfms_secure.train.metrics import evaluate_segmentation
from fedfms_secure.train.model_file import FINAL_MODEL, save_model_file
from fedfms_secure.transport.client import FederationClient, poll

log = logging.getLogger("fedfms_secure.site")


@dataclass
class RoundOutcome:
    round: int
    dice: float
    epsilon: float | None
    seconds: float


def run_site(config: ClientConfig) -> list[RoundOutcome]:
    """Joins the federation and takes part in every remaining round.

    On SIGTERM the site stops between two steps: every file it writes is written atomically, the
    connection is closed, and a restart with the same ``--state`` continues (budget included).
    """
    add_log_file(config.log_file)
    with StateLock(config.state, "site daemon"):  # two daemons on one state would spend the budget twice
        return _run_site(config)


def _run_site(config: ClientConfig) -> list[RoundOutcome]:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    passphrase = read_passphrase(config.passphrase_file)
    bundle = (None if config.insecure and not config.keys.exists()
              else load_bundle(config.keys, role="client", passphrase=passphrase))
    site_dir = _site_folder(config.data)  # fail on a wrong --data before touching the network
    check_local_state(config.state)  # a lost or rolled-back accountant: refused before connecting
    resolve_device(config.device)  # a GPU that is not there: refused before connecting
    client = _connect(config, bundle)
    with client:
        client.wait_ready(config.connect_timeout)
        keys = (Keyring(client, bundle, passphrase=passphrase, timeout=config.round_timeout)
                if bundle is not None else None)
        fingerprint = keys.fingerprint if keys is not None else "plain"
        if fingerprint and keys is not None and fingerprint != client.status().key.fingerprint:
            fingerprint = ""  # not the server's key (an older epoch, an earlier run): keys.sync below follows it
        joined = client.join(fingerprint, __version__)
        if math.isfinite(config.epsilon):
            # the server remembers the rounds that took this site's upload: a wiped or restored
            # --state cannot start the budget over
            check_against_server(config.state, len(joined.contributed_rounds))
        plan = joined.plan
        _check_classes(config, plan)  # before waiting for any key, and before any training
        if plan.scheme == "plain":
            codec, keys = make_site_codec("plain", None, "plain"), None
        elif keys is None:
            raise ConfigError("the federation runs under CKKS: give the site's key bundle with --keys")
        else:
            if bundle.params.packing is not None:
                bundle.params.packing.check_plan(sites=len(bundle.clients), rounds=plan.rounds)
            keys.start_run(joined.key)  # sets aside the keys of an earlier run with this bundle
            keys.sync(joined.key)  # before he-init: waits for this site's envelope
            codec = keys.codec
        log.info("joined", extra={"site": joined.site, "round": joined.round, "rounds": plan.rounds,
                                  "mode": plan.mode, "scheme": plan.scheme, "key_epoch": joined.key.epoch})
        return _Site(config, client, codec, joined, site_dir, keys).run()


def _terminate(signum: int, frame: object) -> None:
    log.warning("SIGTERM: the site stops; restart it with the same --state to continue")
    raise SystemExit(128 + signum)


def _connect(config: ClientConfig, bundle: Bundle | None) -> FederationClient:
    if config.insecure:
        return FederationClient(config.server, insecure=True, site=config.site or (bundle.name if bundle else None),
                                call_timeout=config.call_timeout, reconnect_timeout=config.reconnect_timeout)
    assert bundle is not None
    return FederationClient.from_bundle(bundle, config.server, call_timeout=config.call_timeout,
                                        reconnect_timeout=config.reconnect_timeout)


class _Site:
    def __init__(
        self, config: ClientConfig, client: FederationClient, codec: UpdateCodec, joined: Joined, site_dir: Path,
        keys: Keyring | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.codec = codec
        self.keys = keys
        self.joined = joined
        self.plan: Plan = joined.plan
        config.state.mkdir(parents=True, exist_ok=True)
        # None: the preset's default (tiny ships pretrained weights; official presets load a checkpoint)
        self.model = build_model(self.plan.preset, seed=self.plan.seed, pretrained=None if self.plan.pretrained else False,
                                 num_classes=num_classes_of(config.labels),  # the plan's: checked in run_site
                                 img_size=self.plan.image_size or None)  # 0: an older server, the preset's size
        self.model.to(resolve_device(config.device))  # the flat vector and CKKS stay on the CPU
        self.data = load_site(
            site_dir, image_size=self.model.preset.img_size, split_file=config.state / "split.json", seed=self.plan.seed,
            axis=config.axis, keep_empty_every=config.keep_empty_every, skip_bad=config.skip_bad,
            labels=config.labels, clip_percentiles=config.clip_percentiles,
            cache_dir=config.cache if config.cache is not None else config.state / "cache",
            patient_pattern=config.patient_pattern,
        )
        self.names = apply_mode(self.model, self.plan.mode)
        self.theta0 = flatten(self.model, self.names)
        # under DP the plan's batch size is the expected number of records (patients) per step
        unit = self.config.privacy_unit if self.config.dp else "slice"
        self.records = plan_records(self.data.train, unit=unit, batch_size=self.plan.batch_size)
        self.train_config = TrainConfig(
            epochs=self.plan.local_epochs,
            batch_size=self.records.expected_per_step,
            lr=self.plan.learning_rate,
            seed=self.plan.seed,
            slices_per_patient=self.config.slices_per_patient,
        )
        self.privacy = self._open_privacy()

    def _open_privacy(self) -> SitePrivacy | None:
        if not self.config.dp:
            log.warning("training WITHOUT differential privacy (epsilon = inf)")
            return None
        privacy = open_site_privacy(
            self.config.state, self.records, epochs=self.plan.local_epochs, rounds=self.plan.rounds,
            epsilon=self.config.epsilon, delta=self.config.delta, max_grad_norm=self.config.max_grad_norm,
            accountant=self.config.accountant,
        )
        if privacy.config.unit == "slice":
            log.warning("privacy unit is the SLICE: epsilon holds per slice and does NOT protect patients")
        elif self.config.slices_per_patient > 1:
            log.info("each sampled patient's gradient averages %d of its slices before clipping",
                     self.config.slices_per_patient)
        log.info("privacy calibrated", extra={"noise_multiplier": privacy.noise_multiplier,
                                               "delta": privacy.config.delta, "unit": privacy.config.unit,
                                               "records": self.records.records,
                                               "target_epsilon": self.config.epsilon, "spent": privacy.epsilon()})
        return privacy

    def run(self) -> list[RoundOutcome]:
        outcomes = []
        start = self.joined.round
        theta = self._fetch_theta(start)
        load_vector(self.model, self.names, theta)
        if start == 0:
            initial = self._evaluate()
            self._write_json("initial.json", initial)
            log.info("initial model evaluated", extra={"dice": initial["dice"]})
        round_ = start
        while round_ < self.plan.rounds:
            status = self._wait_for_round(round_)
            self._sync_key(status.key)
            later = missed_round(status, self.joined.site, round_)
            if later is not None:  # e.g. restarted after its commit deadline: training now spends budget for nothing
                log.warning("this round went on without this site: it waits for the next one instead of training",
                            extra={"round": round_, "next_round": later})
                up0, down0 = self.client.bytes_up, self.client.bytes_down
                status = self._wait_for_round(later)
                self._sync_key(status.key)
                round_ = min(max(later, status.round), self.plan.rounds)
                theta = self._fetch_theta(round_)
                # the global model after the round it missed, as after any round (the server's end of
                # the federation waits for every active site's report)
                self._report(round_ - 1, self._load_global(round_, theta), up0, down0, contributed=False)
                continue
            if self._budget_spent(round_):
                break
            outcome, theta = self._round(round_, theta)
            outcomes.append(outcome)
            round_ += 1
        else:
            log.info("federation finished", extra={"rounds": self.plan.rounds,
                                                   "final_model": str(self.config.state / FINAL_MODEL)})
            self._compare_with_start(outcomes)
        return outcomes

    def _compare_with_start(self, outcomes: list[RoundOutcome]) -> None:
        """Warns when the final global model scores worse here than the model the federation started from."""
        try:
            initial = json.loads((self.config.state / "initial.json").read_text())["dice"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # joined after the start: no score of the starting model here
        if outcomes and outcomes[-1].dice < initial:
            log.warning(f"the final global model scores WORSE on this site's validation slices than the starting "
                        f"model (Dice {outcomes[-1].dice:.4f} after {self.plan.rounds} rounds, {initial:.4f} before): "
                        "do not deploy it as is; try more rounds, a larger --epsilon or a lower --learning-rate",
                        extra={"dice_final": outcomes[-1].dice, "dice_initial": initial})

    def _budget_spent(self, round_: int) -> bool:
        """Retires the site (and says so to the server) if this round would pass its budget."""
        if self.privacy is None:
            return False
        steps = self.plan.local_epochs * self.records.steps_per_epoch
        if not self.privacy.would_exceed(steps):
            return False
        reason = (
            f"privacy budget: round {user_round(round_)} would take epsilon from {self.privacy.epsilon():.3f} to "
            f"{self.privacy.epsilon_after(steps):.3f}, past the target {self.config.epsilon:g}"
        )
        active = self.client.retire(round_, reason)
        log.warning("retiring: this site stops contributing; the federation goes on without it",
                    extra={"round": round_, "reason": reason, "active_sites": active})
        return True

    def _round(self, round_: int, theta: np.ndarray) -> tuple[RoundOutcome, np.ndarray]:
        t0 = time.monotonic()
        up0, down0 = self.client.bytes_up, self.client.bytes_down
        load_vector(self.model, self.names, theta)
        result = train_local(self.model, self.data.train, self.train_config, self.privacy)
        if self.privacy is not None:
            append_ledger(self.config.state, {
                "round": round_, "steps": result.steps, "epsilon": self.privacy.epsilon(),
                "delta": self.privacy.config.delta, "noise_multiplier": self.privacy.noise_multiplier,
                "sample_rate": self.privacy.sample_rate, "accountant": self.privacy.config.accountant,
                "unit": self.privacy.config.unit, "records": self.records.records,
            })
        dice_local = self._evaluate()["dice"]
        delta = flatten(self.model, self.names).astype(np.float64) - theta
        weight = self._contribute(round_, delta, result.num_samples)
        self._sync_key(self._wait_for_round(round_ + 1).key)
        new_theta = self._fetch_theta(round_ + 1)
        if self.config.save_updates and weight is not None:
            self._save_update(round_, delta, result.num_samples, weight, new_theta - theta)
        scores = self._load_global(round_ + 1, new_theta)
        dice = scores["dice"]
        epsilon = self.privacy.epsilon() if self.privacy is not None else None
        seconds = time.monotonic() - t0
        self._report(round_, scores, up0, down0, contributed=weight is not None, dice_local=dice_local)
        log.info(f"round {user_round(round_)} of {self.plan.rounds} done: the global model it produced scores Dice "
                 f"{dice:.4f} on this site's validation slices",
                 extra={"round": round_, "dice": dice, "dice_local": dice_local,
                        "epsilon": epsilon if epsilon is not None else math.inf,
                        "epsilon_per": self.privacy.config.unit if self.privacy is not None else "-",
                        "loss": result.loss, "train_seconds": result.seconds, "seconds": seconds})
        return RoundOutcome(round_, dice, epsilon, seconds), new_theta

    def _load_global(self, round_: int, theta: np.ndarray) -> dict[str, float]:
        """Loads the global model that opens ``round_`` (kept as the final model once every round is
        done) and returns its scores on this site's validation slices."""
        load_vector(self.model, self.names, theta)
        if round_ == self.plan.rounds:
            self._save_final_model(round_)
        return self._evaluate()

    def _report(self, round_: int, scores: dict[str, float], up0: int, down0: int, *, contributed: bool,
                dice_local: float | None = None) -> None:
        """Keeps what the site measured after ``round_`` in its own ``STATE/metrics.jsonl`` (the global
        model's scores, ``dice_local``: its own model before averaging, bytes moved since ``up0`` /
        ``down0``, ``contributed``, epsilon spent with its unit), and tells the server only that it is
        done with the round: ``contributed`` and the bytes, which the server knows anyway.

        Nothing else reaches the server: a score is computed on the site's data outside the DP
        guarantee; epsilon depends on n_k through the sampling rate (the server could invert it);
        the training loss and the time taken (a proxy for n_k) stay in the log.
        """
        known = {
            "contributed": 1.0 if contributed else 0.0,
            "bytes_up": float(self.client.bytes_up - up0),
            "bytes_down": float(self.client.bytes_down - down0),
        }
        record = {"site": self.joined.site, "round": round_, "time": time.time(), **scores, **known,
                  **({} if dice_local is None else {"dice_local": dice_local}),
                  "epsilon": self.privacy.epsilon() if self.privacy is not None else None,
                  "epsilon_unit": self.privacy.config.unit if self.privacy is not None else None}
        path = append_metrics(self.config.state, record)
        log.info("round scores kept at this site", extra={"round": round_, "dice": scores["dice"], "iou": scores["iou"],
                                                          "hd95": scores["hd95"], "path": str(path)})
        self.client.report_metrics(round_, known)

    def _contribute(self, round_: int, delta: np.ndarray, n: int) -> float | None:
        """Commit, then upload the weighted delta; returns the weight, or None if the round went on
        without this site (its deadline passed first: the site takes part again in the next round)."""
        try:
            weight = self._exchange_weight(round_, n)
            update = self._bounded(delta * weight, round_)
            try:
                receipt = self.client.upload(lambda: self._chunks(round_, update))
                log.info("update uploaded", extra={"round": round_, "chunks": receipt.chunks, "bytes": receipt.bytes})
            except UpdateAlreadyReceived:
                # a retry after a lost reply re-encrypts, so the server sees a different upload: fine if it
                # had accepted the first one (in the round still open, or in the one that has closed with it)
                status = self.client.status()
                if not (status.round > round_ or self._me(status).uploaded):
                    raise
                log.info("update had been received before the connection dropped", extra={"round": round_})
            return weight
        except FederationError as exc:
            if exc.code != "failed_precondition" or not self._left_behind(round_):
                raise
            log.warning("this round went on without this site (its deadline passed first); it takes part "
                        "again from the next round", extra={"round": round_, "reason": str(exc)})
            return None

    def _left_behind(self, round_: int) -> bool:
        status = self.client.status()
        return missed_round(status, self.joined.site, round_) is not None and not self._me(status).retired

    def _codec_bound(self) -> float | None:
        """The bound the CKKS codec clips weighted updates to (None: plaintext, or no bound)."""
        return None if self.codec.scheme == "plain" or math.isinf(self.codec.bound) else self.codec.bound

    def _bounded(self, update: np.ndarray, round_: int) -> np.ndarray:
        """Clips the weighted update to the codec's bound (post-processing: DP is unaffected)."""
        bound = self._codec_bound()
        if bound is None:
            return update
        bounded, clipped = clip_to_bound(update, bound)
        log.log(logging.WARNING if clipped else logging.INFO, "update values clipped to the CKKS bound",
                extra={"round": round_, "values": clipped, "of": int(update.size), "bound": bound})
        return bounded

    def _exchange_weight(self, round_: int, n: int) -> float:
        """Commit E(n_k), wait for E(N), decrypt it: returns n_k / N."""
        try:
            self.client.commit_weight(round_, self.codec.fingerprint, self.codec.encrypt_scalar(float(n)))
        except FederationError as exc:
            # the key was rotated at this round's boundary after this site fetched the state: its
            # plaintext update is still valid, only its encryption must use the new key
            if exc.code != "failed_precondition" or not self._sync_key(self.client.status().key):
                raise
            log.info("CKKS key rotated before this site committed: encrypting again", extra={"round": round_})
            self.client.commit_weight(round_, self.codec.fingerprint, self.codec.encrypt_scalar(float(n)))
        total = poll(
            lambda: self.client.weight_total(round_),
            lambda t: t.ready,
            timeout=self.config.round_timeout,
            what=f"all sites to commit in round {user_round(round_)}",
            waiting_on=lambda: self._missing("committed"),
        )
        big_n = self.codec.decrypt_scalar(total.payload)
        if not big_n >= n - 0.5:
            raise FederationError(f"decrypted total weight {big_n:.3f} is below this site's own {n}: "
                                  "a site may be using another CKKS context", "invalid_argument")
        return n / round(big_n)

    def _chunks(self, round_: int, vector: np.ndarray) -> Iterator[Chunk]:
        """Encrypts chunk by chunk while streaming, so at most one ciphertext is held at a time."""
        # the same seed, site and round always quantise the same way (reruns are reproducible)
        self.codec.seed_rounding(self.plan.seed, zlib.crc32(self.joined.site.encode()), round_)
        step = self.codec.chunk_values
        total = math.ceil(vector.size / step)
        for index in range(total):
            part = vector[index * step : (index + 1) * step]
            yield Chunk(
                round=round_,
                index=index,
                total=total,
                num_values=part.size,
                fingerprint=self.codec.fingerprint,
                payload=self.codec.encrypt_vector(part)[0],
                vector_length=vector.size,
            )

    def _fetch_theta(self, round_: int) -> np.ndarray:
        if round_ == 0:
            return self.theta0.astype(np.float64)
        chunks = self.client.global_state(round_)
        if not chunks:  # every round so far closed without an upload (its committed sites retired)
            log.warning("the global state is still theta_0: no round so far has summed an update",
                        extra={"round": round_})
            return self.theta0.astype(np.float64)
        if any(c.fingerprint != self.codec.fingerprint for c in chunks) and self._sync_key(self.client.status().key):
            chunks = self.client.global_state(round_)  # re-encrypted under a key rotated meanwhile
        for chunk in chunks:
            if chunk.fingerprint != self.codec.fingerprint:
                raise FederationError(
                    f"global state was made under context {chunk.fingerprint}, this site uses "
                    f"{self.codec.fingerprint}", "invalid_argument")
        length = chunks[0].vector_length
        if length != self.theta0.size:
            raise FederationError(
                f"global state has {length} values, this site's {self.plan.mode} model communicates "
                f"{self.theta0.size}", "invalid_argument")
        return self.theta0.astype(np.float64) + self.codec.decrypt_vector([c.payload for c in chunks], length)

    def _sync_key(self, announced: KeyEpoch) -> bool:
        """Follows the server's CKKS key epoch; True when the site switched to a new key."""
        if self.keys is None or not self.keys.sync(announced):
            return False
        self.codec = self.keys.codec
        return True

    def _wait_for_round(self, round_: int) -> Status:
        return poll(
            self.client.status,
            lambda s: s.round >= round_,
            timeout=self.config.round_timeout,
            what=f"round {user_round(round_)} to open" if round_ < self.plan.rounds else "the last round to close",
            waiting_on=lambda: self._missing("uploaded"),
        )

    def _me(self, status):
        return next(s for s in status.sites if s.name == self.joined.site)

    def _missing(self, field: str) -> str:
        status = self.client.status()
        return ", ".join(s.name for s in status.sites if not getattr(s, field)) or "nobody"

    def _evaluate(self) -> dict[str, float]:
        """The model's scores on the validation slices, as the site keeps them: ``dice``, ``iou``,
        ``hd95`` (means over images) and their ``*_std``; ``dice_class_k`` per class with several
        classes. Aggregates only: no number of images."""
        summary = evaluate_segmentation(self.model, self.data.val, self.data.class_names)
        scores = {}
        for metric in ("dice", "iou", "hd95"):
            scores[metric] = summary[f"{metric}_mean"]
            scores[f"{metric}_std"] = summary[f"{metric}_std"]
        if len(summary["per_class"]) > 1:
            for k, entry in enumerate(summary["per_class"], start=1):
                scores[f"dice_class_{k}"] = entry["dice_mean"]
        return scores

    def _save_final_model(self, rounds: int) -> None:
        """The final global model (as decrypted here) in STATE/final_model.pt, for `fedfms-secure evaluate`."""
        assert self.data.preprocessing is not None
        path = save_model_file(
            self.config.state / FINAL_MODEL, self.model, self.names, mode=self.plan.mode, seed=self.plan.seed,
            pretrained=self.plan.pretrained, data=self.data.preprocessing.describe(), label_spec=self.config.labels,
            source="federated", info={"plan": dataclasses.asdict(self.plan), "rounds": rounds, "site": self.joined.site},
        )
        log.info("final global model saved", extra={"path": str(path)})

    def _save_update(self, round_: int, delta, n: int, weight: float, aggregate) -> None:
        folder = self.config.state / "updates"
        folder.mkdir(exist_ok=True)
        # atomically: a site stopped while writing (SIGTERM between two steps) leaves no partial file
        buffer = io.BytesIO()
        # the bound the weighted update was clipped to and the quantisation step (0 and inf: none)
        bound = self._codec_bound()
        np.savez(buffer, delta=delta, n=n, weight=weight, aggregate=aggregate,
                 bound=np.inf if bound is None else bound, step=self.codec.step)
        write_atomic(folder / f"round_{round_}.npz", buffer.getvalue())

    def _write_json(self, name: str, data: dict) -> None:
        write_atomic(self.config.state / name, (json.dumps(data, indent=2) + "\n").encode())


def _check_classes(config: ClientConfig, plan: Plan) -> None:
    """ConfigError if the plan fixes another number of classes than this site's label map gives."""
    classes = num_classes_of(config.labels)
    if plan.num_classes and classes != plan.num_classes:  # the updates' lengths would not match
        raise ConfigError(
            f"this site's label map ({config.labels or 'default: every label > 0 is the foreground'}) gives "
            f"{classes} foreground class(es), but the federation's plan has {plan.num_classes}: give "
            f"--labels with a map to {plan.num_classes} class(es), as the other sites do"
        )


def missed_round(status: Status, site: str, round_: int) -> int | None:
    """The round ``site`` can next take part in if ``round_`` can no longer take its update, else None.

    ``round_`` is lost once it has closed, or once its commits have closed without this site (the
    upload phase: E(N) is the committed sites' total). Training it then would spend privacy budget
    on an update that nobody takes.
    """
    if status.round > round_:
        return status.round
    me = next((s for s in status.sites if s.name == site), None)
    if status.round == round_ and status.phase == PHASE_UPLOAD and (me is None or not me.committed):
        return round_ + 1
    return None


def _site_folder(data: Path) -> Path:
    sites = find_sites(data)
    if len(sites) != 1:
        raise DataError(
            f"{data} holds {len(sites)} sites; a client trains on exactly one: pass its folder "
            f"(e.g. {sites[0]}) to --data"
        )
    return sites[0]
