"""The outbound policy: which addresses an image fetch may connect to.

Task data come from whoever can write to a Label Studio project or call /predict, and the worker fetches their
URLs from inside the network. So by default only public (globally routable) addresses are reached; loopback,
private (RFC 1918, fc00::/7), link-local (169.254.0.0/16 with the cloud metadata services, fe80::/10), multicast,
unspecified and other special-purpose addresses are refused unless the operator allows them by network
(FETCH_ALLOW_NETWORKS) or by host name (FETCH_ALLOW_HOSTS). Pure functions and data: the connections that apply
it are in backend/images/network.py.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are an IPv4 address
# Underscores are not valid in DNS host names, but Docker and Compose service names use them and resolve.
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundPolicy:
    """Addresses allowed despite not being public, and host names allowed whatever they resolve to.

    allow_hosts: lower-case names without a trailing dot; ".corp.example" allows the subdomains of corp.example
    (a.corp.example, not corp.example itself).
    """

    allow_networks: tuple[Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()

    def host_allowed(self, host: str) -> bool:
        """Whether the URL host `host` (a name as in the URL, any case, maybe with a trailing dot) is allowed."""
        name = host.lower().rstrip(".")
        return any(name.endswith(entry) if entry.startswith(".") else name == entry for entry in self.allow_hosts)

    def refusal(self, address: Address) -> str | None:
        """None when `address` may be connected to, else what kind of address it is ("loopback", ...)."""
        kind = address_kind(address)
        if kind is None or any(_normalised(address) in network for network in self._networks_for(address)):
            return None
        return kind

    def _networks_for(self, address: Address) -> tuple[Network, ...]:
        """The allowed networks of `address`'s family once normalised (::ffff:10.0.0.1 is checked as 10.0.0.1)."""
        version = _normalised(address).version
        return tuple(network for network in self.allow_networks if network.version == version)


def address_kind(address: Address) -> str | None:
    """None for a public address, else why it is not one: loopback, unspecified, link-local, multicast, private
    or special-purpose. IPv4 addresses inside IPv6 ones (::ffff:a.b.c.d, 64:ff9b::a.b.c.d, 6to4) count as both."""
    address = _normalised(address)
    inner = _embedded_ipv4(address)
    if inner is not None and address_kind(inner) is not None:
        return address_kind(inner)
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if any(address in network for network in _PRIVATE if network.version == address.version) or (
        address.version == 6 and address.is_site_local  # fec0::/10, deprecated but still routed privately
    ):
        return "private"
    if address.is_private or address.is_reserved or not address.is_global:
        return "special-purpose"
    return None


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """FETCH_ALLOW_NETWORKS: comma-separated CIDRs or single addresses. ValueError names the bad entry."""
    networks = []
    for entry in _entries(text):
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as exc:
            raise ValueError(f"FETCH_ALLOW_NETWORKS: {entry!r} is not an IP network or address ({exc})") from None
    return tuple(networks)


def parse_hosts(text: str | None) -> tuple[str, ...]:
    """FETCH_ALLOW_HOSTS: comma-separated host names, a leading dot for subdomains; lower-cased.
    ValueError names the bad entry (addresses belong in FETCH_ALLOW_NETWORKS)."""
    hosts = []
    for entry in _entries(text):
        name = entry.lower().rstrip(".")
        labels = name.removeprefix(".").split(".")
        if not all(_HOST_LABEL.match(label) for label in labels) or len(name) > 253:
            raise ValueError(f"FETCH_ALLOW_HOSTS: {entry!r} is not a host name (ASCII letters, digits, '-', '_', '.')")
        if labels[-1].isdigit() or ip_literal(name) is not None:
            raise ValueError(f"FETCH_ALLOW_HOSTS: {entry!r} is an address; list addresses in FETCH_ALLOW_NETWORKS")
        hosts.append(name)
    return tuple(hosts)


def ip_literal(host: str) -> Address | None:
    """The address a URL host names literally ("127.0.0.1", "::1"), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _entries(text: str | None) -> list[str]:
    return [entry.strip() for entry in (text or "").split(",") if entry.strip()]


def _normalised(address: Address) -> Address:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64 or 6to4 address forwards to, if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour
