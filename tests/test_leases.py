"""The lease table (CONTRACT §6): grant, renew, release and expiry, with time moved by
hand through a fake clock."""

from __future__ import annotations

import pytest

from llama_actors import (
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseNotRenewableError,
    NotReadyError,
    UsageError,
)
from llama_actors._kernel.leases import LeaseTable


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> LeaseTable:
    return LeaseTable(lambda: clock.now)


def test_a_granted_lease_expires_its_ttl_after_now(table: LeaseTable) -> None:
    lease = table.grant("chat-1", "worker-7", ttl_ms=30_000)
    assert lease.lease_ref.startswith("lease-")
    assert lease.instance_id == "chat-1"
    assert lease.owner_ref == "worker-7"
    assert lease.ttl_ms == 30_000
    assert lease.renewable is True
    assert lease.granted_at == 100.0
    assert lease.expires_at == 130.0
    assert table.get(lease.lease_ref) == lease
    assert table.count("chat-1") == 1
    assert table.leases_of("chat-1") == [lease]
    assert table.next_expiry() == 130.0


def test_every_grant_gets_its_own_ref(table: LeaseTable) -> None:
    refs = {table.grant("chat-1", None, ttl_ms=1000).lease_ref for _ in range(50)}
    assert len(refs) == 50
    assert table.count("chat-1") == 50


@pytest.mark.parametrize("ttl_ms", [0, -1])
def test_a_ttl_that_is_not_positive_is_rejected(table: LeaseTable, ttl_ms: int) -> None:
    with pytest.raises(UsageError, match="ttl_ms must be a positive number"):
        table.grant("chat-1", None, ttl_ms=ttl_ms)
    assert table.count("chat-1") == 0


def test_renew_extends_from_now(table: LeaseTable, clock: FakeClock) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000)
    clock.now = 108.0
    renewed = table.renew(lease.lease_ref)
    assert renewed.lease_ref == lease.lease_ref
    assert renewed.granted_at == 100.0
    assert renewed.expires_at == 118.0
    assert table.get(lease.lease_ref) == renewed


def test_renew_with_a_new_ttl_keeps_it(table: LeaseTable, clock: FakeClock) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000)
    renewed = table.renew(lease.lease_ref, ttl_ms=60_000)
    assert renewed.ttl_ms == 60_000
    assert renewed.expires_at == 160.0
    clock.now = 150.0
    assert table.renew(lease.lease_ref).expires_at == 210.0


def test_renew_with_a_ttl_that_is_not_positive_is_rejected(table: LeaseTable) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000)
    with pytest.raises(UsageError, match="ttl_ms must be a positive number"):
        table.renew(lease.lease_ref, ttl_ms=0)
    assert table.get(lease.lease_ref) == lease


def test_a_lease_granted_as_not_renewable_cannot_be_renewed_and_stays_live(
    table: LeaseTable, clock: FakeClock
) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000, renewable=False)
    clock.now = 105.0
    with pytest.raises(LeaseNotRenewableError, match=r"renewable=False.*take a new lease"):
        table.renew(lease.lease_ref)
    assert table.get(lease.lease_ref) == lease
    assert table.count("chat-1") == 1
    assert table.next_expiry() == 110.0


def test_renewing_a_not_renewable_lease_past_its_ttl_says_it_expired(
    table: LeaseTable, clock: FakeClock
) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000, renewable=False)
    clock.now = 111.0
    with pytest.raises(LeaseExpiredError):
        table.renew(lease.lease_ref)


def test_a_leases_metadata_is_its_own_copy_and_survives_renewal(
    table: LeaseTable, clock: FakeClock
) -> None:
    given = {"team": "search"}
    lease = table.grant("chat-1", None, ttl_ms=10_000, metadata=given)
    given["team"] = "changed"
    clock.now = 105.0
    renewed = table.renew(lease.lease_ref, ttl_ms=20_000)
    assert lease.metadata == {"team": "search"}
    assert renewed.metadata == {"team": "search"}
    assert (renewed.ttl_ms, renewed.expires_at, renewed.granted_at) == (20_000, 125.0, 100.0)
    assert table.grant("chat-1", None, ttl_ms=1_000).metadata == {}


def test_next_expiry_follows_a_renewal(table: LeaseTable, clock: FakeClock) -> None:
    first = table.grant("chat-1", None, ttl_ms=1_000)
    table.grant("chat-1", None, ttl_ms=2_000)
    assert table.next_expiry() == 101.0
    clock.now = 100.5
    table.renew(first.lease_ref, ttl_ms=5_000)
    assert table.next_expiry() == 102.0


def test_next_expiry_is_none_without_live_leases(table: LeaseTable) -> None:
    assert table.next_expiry() is None
    lease = table.grant("chat-1", None, ttl_ms=1_000)
    table.release(lease.lease_ref)
    assert table.next_expiry() is None


def test_expire_due_ends_only_due_leases_earliest_first(
    table: LeaseTable, clock: FakeClock
) -> None:
    late = table.grant("chat-1", "a", ttl_ms=3_000)
    early = table.grant("chat-2", "b", ttl_ms=1_000)
    middle = table.grant("chat-1", "c", ttl_ms=2_000)
    never = table.grant("chat-2", "d", ttl_ms=60_000)
    assert table.expire_due() == []
    clock.now = 103.0
    assert table.expire_due() == [early, middle, late]
    assert table.live() == [never]
    assert table.count("chat-1") == 0
    assert table.ended(early.lease_ref) == "expired"
    assert table.next_expiry() == 160.0


def test_a_lease_is_due_exactly_at_its_expiry(table: LeaseTable, clock: FakeClock) -> None:
    lease = table.grant("chat-1", None, ttl_ms=1_000)
    clock.now = 100.999
    assert table.expire_due() == []
    clock.now = 101.0
    assert table.expire_due() == [lease]


def test_a_renewed_lease_is_not_expired_at_its_old_time(
    table: LeaseTable, clock: FakeClock
) -> None:
    lease = table.grant("chat-1", None, ttl_ms=1_000)
    clock.now = 100.8
    renewed = table.renew(lease.lease_ref)
    clock.now = 101.5
    assert table.expire_due() == []
    clock.now = 101.8
    assert table.expire_due() == [renewed]


def test_renewing_an_expired_lease_says_to_renew_earlier_or_resolve_again(
    table: LeaseTable, clock: FakeClock
) -> None:
    lease = table.grant("chat-1", None, ttl_ms=1_000)
    clock.now = 102.0
    table.expire_due()
    with pytest.raises(LeaseExpiredError) as info:
        table.renew(lease.lease_ref)
    assert info.value.lease_ref == lease.lease_ref
    assert lease.lease_ref in str(info.value)
    assert "expired" in str(info.value)
    assert "renew before its TTL runs out" in str(info.value)
    assert "resolve again" in str(info.value)


def test_renewing_a_lease_past_its_ttl_fails_even_before_expiry_ran(
    table: LeaseTable, clock: FakeClock
) -> None:
    lease = table.grant("chat-1", None, ttl_ms=1_000)
    clock.now = 101.0
    with pytest.raises(LeaseExpiredError, match="resolve again"):
        table.renew(lease.lease_ref)
    # The failed renew leaves the ending to expire_due, whose caller (the broker) sends
    # lease_expired for it: a lease never ends without its signal.
    assert [ended.lease_ref for ended in table.expire_due()] == [lease.lease_ref]
    assert table.get(lease.lease_ref) is None
    assert table.count("chat-1") == 0
    with pytest.raises(LeaseExpiredError):
        table.renew(lease.lease_ref)


def test_renewing_an_unknown_lease_is_not_found(table: LeaseTable) -> None:
    with pytest.raises(LeaseNotFoundError) as info:
        table.renew("lease-nope")
    assert info.value.lease_ref == "lease-nope"
    assert "lease-nope" in str(info.value)
    assert not isinstance(info.value, LeaseExpiredError)


def test_renewing_a_released_lease_is_not_found_and_says_released(table: LeaseTable) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000)
    table.release(lease.lease_ref)
    with pytest.raises(LeaseNotFoundError, match="released") as info:
        table.renew(lease.lease_ref)
    assert "resolve again" in str(info.value)


def test_release_is_idempotent(table: LeaseTable) -> None:
    lease = table.grant("chat-1", None, ttl_ms=10_000)
    assert table.release(lease.lease_ref) == lease
    assert table.release(lease.lease_ref) is None
    assert table.release("lease-never-granted") is None
    assert table.count("chat-1") == 0
    assert table.ended(lease.lease_ref) == "released"


def test_a_released_lease_does_not_expire_later(table: LeaseTable, clock: FakeClock) -> None:
    lease = table.grant("chat-1", None, ttl_ms=1_000)
    table.release(lease.lease_ref)
    clock.now = 200.0
    assert table.expire_due() == []
    assert table.ended(lease.lease_ref) == "released"


def test_a_closed_instance_takes_no_new_leases(table: LeaseTable) -> None:
    kept = table.grant("chat-1", None, ttl_ms=10_000)
    table.close_instance("chat-1", "draining")
    with pytest.raises(NotReadyError) as info:
        table.grant("chat-1", None, ttl_ms=10_000)
    assert info.value.instance_id == "chat-1"
    assert "draining" in str(info.value)
    assert "resolve again" in str(info.value)
    # existing leases live on, and other instances are not affected
    assert table.renew(kept.lease_ref).lease_ref == kept.lease_ref
    assert table.grant("chat-2", None, ttl_ms=10_000).instance_id == "chat-2"


def test_a_reopened_instance_takes_leases_again(table: LeaseTable) -> None:
    table.close_instance("chat-1", "stopping")
    table.open_instance("chat-1")
    assert table.grant("chat-1", None, ttl_ms=10_000).instance_id == "chat-1"


def test_end_instance_ends_every_lease_on_it(table: LeaseTable) -> None:
    a = table.grant("chat-1", "a", ttl_ms=10_000)
    b = table.grant("chat-1", "b", ttl_ms=10_000)
    other = table.grant("chat-2", "c", ttl_ms=10_000)
    ended = table.end_instance("chat-1", "instance stopped")
    assert sorted(ended, key=lambda lease: lease.lease_ref) == sorted(
        [a, b], key=lambda lease: lease.lease_ref
    )
    assert table.count("chat-1") == 0
    assert table.live() == [other]
    assert table.end_instance("chat-1", "instance stopped") == []
    with pytest.raises(LeaseNotFoundError, match="instance stopped"):
        table.renew(a.lease_ref)
    assert table.next_expiry() == other.expires_at
