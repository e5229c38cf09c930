"""Sites that retire (e.g. their privacy budget is spent): the federation goes on with the others."""

from __future__ import annotations

import numpy as np
import pytest

from fedfms_secure.he.codec import make_site_codec, make_aggregator
from fedfms_secure.errors import FederationError
from fedfms_secure.protocol import PHASE_COMMIT, PHASE_DONE, PHASE_UPLOAD, Chunk, Plan
from fedfms_secure.server.coordinator import Coordinator
from fedfms_secure.server.store import StateStore

SITES = ("a", "b", "c")


@pytest.fixture()
def codec():
    return make_site_codec("plain", None, "plain")


def coordinator(tmp_path, rounds=2, **kwargs):
    plan = Plan("t", rounds, "fedmsa", "tiny", 0, 1, 4, 1e-3, "plain")
    return Coordinator(plan, SITES, make_aggregator("plain", None), "plain", StateStore(tmp_path), **kwargs)


def upload(coord, codec, site, round_, vec):
    payload = codec.encrypt_vector(vec)[0]
    coord.receive_upload(site, [Chunk(round_, 0, 1, vec.size, "plain", payload, vec.size)])


def test_a_site_retiring_before_it_commits_lets_the_round_close(tmp_path, codec):
    coord = coordinator(tmp_path)
    coord.commit_weight("a", 0, "plain", codec.encrypt_scalar(1))
    coord.commit_weight("b", 0, "plain", codec.encrypt_scalar(3))
    assert coord.status().phase == PHASE_COMMIT
    assert coord.retire("c", 0, "privacy budget spent") == 2
    assert coord.status().phase == PHASE_UPLOAD
    assert codec.decrypt_scalar(coord.weight_total("a", 0).payload) == 4
    upload(coord, codec, "a", 0, np.full(3, 0.25))
    upload(coord, codec, "b", 0, np.full(3, 0.75))
    status = coord.status()
    assert status.round == 1 and status.phase == PHASE_COMMIT
    assert [s.retired for s in status.sites] == [False, False, True]
    assert "budget" in status.sites[2].retired_reason
    with pytest.raises(FederationError, match="retired") as exc:
        coord.commit_weight("c", 1, "plain", codec.encrypt_scalar(1))
    assert exc.value.code == "failed_precondition"
    # the retirement survives a restart of the coordinator
    assert [s.retired for s in coordinator(tmp_path).status().sites] == [False, False, True]


def test_a_committed_site_that_retires_counts_as_a_zero_delta(tmp_path, codec):
    coord = coordinator(tmp_path, rounds=1)
    for site in SITES:
        coord.commit_weight(site, 0, "plain", codec.encrypt_scalar(1))
    upload(coord, codec, "a", 0, np.full(2, 1 / 3))
    upload(coord, codec, "b", 0, np.full(2, 1 / 3))
    coord.retire("c", 0, "stopped")
    assert coord.status().phase == PHASE_DONE
    chunk = coord.global_chunk(1, 0)
    np.testing.assert_allclose(codec.decrypt_vector([chunk.payload], 2), np.full(2, 2 / 3))


def test_when_every_site_retires_the_federation_stops(tmp_path):
    coord = coordinator(tmp_path)
    for site in SITES:
        coord.retire(site, 0, "done")
    assert coord.status().phase == PHASE_DONE
    assert coord.finished.is_set()


def test_a_round_whose_committed_sites_all_retire_carries_the_state_over(tmp_path, codec):
    """Round 1: a and b commit, the commit deadline leaves c out, then a and b retire before uploading."""
    now = [0.0]

    def make():
        return coordinator(tmp_path, rounds=4, clock=lambda: now[0], round_deadline=10, min_sites=2)

    coord = make()
    for site in SITES:
        coord.commit_weight(site, 0, "plain", codec.encrypt_scalar(1))
    for site in SITES:
        upload(coord, codec, site, 0, np.full(3, 0.125))
    assert coord.status().round == 1
    before = codec.decrypt_vector([coord.global_chunk(1, 0).payload], 3)
    coord.commit_weight("a", 1, "plain", codec.encrypt_scalar(1))
    coord.commit_weight("b", 1, "plain", codec.encrypt_scalar(1))
    now[0] += 11
    coord.tick()
    assert coord.status().phase == PHASE_UPLOAD
    coord.retire("a", 1, "stopped")
    assert coord.status().round == 1  # b may still upload
    coord.retire("b", 1, "stopped")
    status = coord.status()
    assert (status.round, status.phase) == (2, PHASE_COMMIT)  # closed, not stalled
    assert coord.global_state("c", 2) == 1
    np.testing.assert_array_equal(codec.decrypt_vector([coord.global_chunk(2, 0).payload], 3), before)
    # after a restart, c goes on from the carried state
    coord = make()
    coord.commit_weight("c", 2, "plain", codec.encrypt_scalar(1))
    upload(coord, codec, "c", 2, np.full(3, 0.5))
    assert coord.status().round == 3
    np.testing.assert_allclose(codec.decrypt_vector([coord.global_chunk(3, 0).payload], 3), before + 0.5)


def test_a_first_round_without_uploads_leaves_theta_0(tmp_path, codec):
    now = [0.0]

    def make():
        return coordinator(tmp_path, rounds=3, clock=lambda: now[0], round_deadline=10, min_sites=2)

    coord = make()
    coord.commit_weight("a", 0, "plain", codec.encrypt_scalar(1))
    coord.commit_weight("b", 0, "plain", codec.encrypt_scalar(1))
    now[0] += 11
    coord.tick()
    coord.retire("a", 0, "stopped")
    coord.retire("b", 0, "stopped")
    assert coord.status().round == 1
    assert coord.global_state("c", 1) == 0  # no chunks: the sites start from theta_0
    coord = make()  # a restart does not take the empty state for the federation's vector length
    coord.commit_weight("c", 1, "plain", codec.encrypt_scalar(1))
    upload(coord, codec, "c", 1, np.full(4, 0.25))
    assert coord.status().round == 2
    np.testing.assert_allclose(codec.decrypt_vector([coord.global_chunk(2, 0).payload], 4), np.full(4, 0.25))


def test_a_restart_once_done_remembers_who_reported_the_final_metrics(tmp_path, codec):
    coord = coordinator(tmp_path, rounds=1)
    for site in SITES:
        coord.commit_weight(site, 0, "plain", codec.encrypt_scalar(1))
    for site in SITES:
        upload(coord, codec, site, 0, np.full(2, 0.1))
    assert coord.status().phase == PHASE_DONE
    coord.report_metrics("a", 0, {"bytes_up": 5.0})
    coord.report_metrics("b", 0, {"bytes_up": 6.0})
    assert not coord.finished.is_set()
    # a line cut short by a crash is skipped, and the records written after it stay whole
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"site": "a", "rou')
    coord = coordinator(tmp_path, rounds=1)  # restarted: still waiting for c only
    assert not coord.finished.is_set()
    coord.report_metrics("c", 0, {"bytes_up": 7.0})
    assert coord.finished.is_set()
    assert coordinator(tmp_path, rounds=1).finished.is_set()  # and a restart after that need not wait at all
    coord = coordinator(tmp_path, rounds=1)
    assert coord.finished.is_set()
    coord.report_metrics("b", 0, {"bytes_up": 65.0})  # one report per site and round: a repeat is not written
    records = StateStore(tmp_path).read_records("metrics.jsonl", skip_bad=True)
    assert [r["site"] for r in records] == ["a", "b", "c"] and records[1]["bytes_up"] == 6.0 and records[2]["bytes_up"] == 7.0
