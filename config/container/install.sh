#!/bin/sh
# Install interceptd system-wide on Debian 12, as root: /opt/interceptd (a venv that sees Debian's
# python3-nftables, the libnftables binding that is not on PyPI), with interceptd and istio-iptables
# linked into /usr/local/bin.
#
# One script, three callers, so they cannot diverge: the Containerfile RUNs it, `make image-test` runs it
# in a debootstrap'd Debian 12 root, and the README tells a VM's administrator to run it.
#
#   install.sh [--image] SRC
#     SRC      the source tree (pyproject.toml, README.md, daemon/, config/container/)
#     --image  then remove what an image must not carry: pip and setuptools, python3-venv, apt's lists
#              and caches, logs. Without it the host keeps its apt lists and venv tooling.
set -eu

image=no
if [ "${1:-}" = "--image" ]; then
	image=yes
	shift
fi
src=${1:?usage: install.sh [--image] SRC}
prefix=/opt/interceptd

export DEBIAN_FRONTEND=noninteractive
# Package versions are pinned by the Debian release (the base image's dated tag), not here: the mirror
# drops superseded versions, so an exact pin would break every build after a security update.
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 python3-venv python3-nftables >/dev/null

python3 -m venv --system-site-packages "$prefix"
# Build from a copy holding only what the package needs, so no egg-info or bytecode of the caller's
# checkout leaks in and a read-only SRC works.
work=$(mktemp -d)
cp -R "$src/pyproject.toml" "$src/README.md" "$src/daemon" "$work/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
find "$work" -name '*.egg-info' -prune -exec rm -rf {} +
"$prefix/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check \
	--constraint "$src/config/container/constraints.txt" "$work"
rm -rf "$work"
"$prefix/bin/python" -c 'import nftables' || {
	echo "install.sh: python3-nftables is not importable from $prefix" >&2
	exit 1
}
ln -sf "$prefix/bin/interceptd" "$prefix/bin/istio-iptables" /usr/local/bin/

if [ "$image" = yes ]; then
	"$prefix/bin/python" -m pip uninstall --quiet --yes pip setuptools
	apt-get purge -y -qq python3-venv python3.11-venv >/dev/null
	apt-get autoremove -y -qq --purge >/dev/null
	apt-get clean
	rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
		/root/.cache
fi
echo "install.sh: $("$prefix/bin/interceptd" --version) in $prefix"
