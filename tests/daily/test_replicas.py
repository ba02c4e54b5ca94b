"""daily/replicas.py: replica discovery by DNS (one URL per address) and by list."""

from __future__ import annotations

import pytest

from daily.replicas import ReplicaError, resolve


def test_dns_gives_one_url_per_address_after_the_listed_ones():
    urls = resolve(("http://10.0.0.9:8000",), "localhost:8123")
    assert urls[0] == "http://10.0.0.9:8000"
    assert "http://127.0.0.1:8123" in urls[1:]
    assert all(u.endswith(":8123") for u in urls[1:]) and len(set(urls)) == len(urls)
    assert all(u.startswith("http://[") for u in urls[1:] if u.count(":") > 2)  # IPv6 bracketed


@pytest.mark.parametrize("dns", ["localhost", "localhost:http", ":8000"])
def test_a_dns_name_without_a_port_is_refused(dns):
    with pytest.raises(ReplicaError, match="expects HOST:PORT"):
        resolve((), dns)
