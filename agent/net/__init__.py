"""Node networking drivers for VM guests: bridges, DHCP/DNS (dnsmasq) and NAT (nftables)."""
