#!/bin/bash
# `make image-test`: run the Containerfile's install step (config/container/install.sh --image) on a real
# Debian 12 root built by debootstrap, then use the result as the image would be used: --version, render,
# and, with nothing but CAP_NET_ADMIN on a read-only root in a network namespace of our own, the
# istio-iptables alias, status, cleanup, and `interceptd run` answering the HEALTHCHECK command and /readyz.
#
#   image-test.sh CACHE_DIR    the debootstrap'd base is kept in CACHE_DIR/bookworm and reused;
#                              DEBIAN_MIRROR overrides the mirror (default: the one this machine's apt uses)
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=${1:?usage: image-test.sh CACHE_DIR}
base=$cache/bookworm
root=$cache/root
step() { printf '\n== image-test [%ss]: %s\n' "$SECONDS" "$*"; }
fail() { echo "image-test: FAILED: $*" >&2; exit 1; }

# The first Debian (not -security) URI in this machine's apt sources, deb822 or one-line format.
apt_mirror() {
	local uri
	uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's|^URIs:[[:space:]]*\([^[:space:]]*/debian\)/*[[:space:]]*$|\1|p' | head -n1)
	[ -n "$uri" ] || uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		sed -n 's|^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*/debian\)/*[[:space:]].*|\2|p' | head -n1)
	echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -e "$base/.complete" ]; then
	mirror=${DEBIAN_MIRROR:-$(apt_mirror)}
	step "debootstrap bookworm from $mirror into $base (cached for later runs)"
	rm -rf "$base" "$base.partial"
	mkdir -p "$cache"
	debootstrap --variant=minbase bookworm "$base.partial" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
		{ tail -n 20 "$cache/debootstrap.log"; fail "debootstrap"; }
	# The apt sources of Debian's container images (deb822), on the same mirror.
	rm -f "$base.partial/etc/apt/sources.list"
	cat >"$base.partial/etc/apt/sources.list.d/debian.sources" <<-SOURCES
		Types: deb
		URIs: $mirror
		Suites: bookworm bookworm-updates
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

		Types: deb
		URIs: ${mirror}-security
		Suites: bookworm-security
		Components: main
		Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
	SOURCES
	chroot "$base.partial" apt-get clean
	touch "$base.partial/.complete"
	mv "$base.partial" "$base"
fi

step "fresh copy of the base root"
rm -rf "$root"
trap 'rm -rf "$root"' EXIT
cp -a "$base" "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The build context as the Containerfile's RUN sees it: the tree minus .dockerignore.
mkdir -p "$root/tmp/src"
tar --exclude-from=.dockerignore -cf - . | tar -C "$root/tmp/src" -xf -

step "install.sh --image (the Containerfile's RUN)"
# A clean environment, as a build has: none of this machine's pip settings leak in. The one thing passed
# on is this machine's CA bundle, for networks whose HTTPS proxy re-signs PyPI's certificate.
build_env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root)
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
	cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
	build_env+=(PIP_CERT=/tmp/host-ca.crt)
fi
# Private mount and PID namespaces: /proc, /dev and any process left behind vanish with them.
unshare --mount --pid --fork --propagation private -- bash -euc '
	root=$1; shift
	mount -t proc proc "$root/proc"
	mount --rbind /dev "$root/dev"
	env -i "$@" chroot "$root" sh /tmp/src/config/container/install.sh --image /tmp/src
' image-test "$root" "${build_env[@]}"
rm -rf "$root/tmp/src" "$root/tmp/host-ca.crt"

step "nothing left behind: no compiler, no pip, no apt lists or caches"
for path in usr/bin/gcc usr/bin/cc opt/interceptd/bin/pip root/.cache; do
	[ ! -e "$root/$path" ] || fail "/$path is in the image"
done
left=$(find "$root/var/lib/apt/lists" "$root/var/cache/apt" -mindepth 1 -print -quit 2>/dev/null)
[ -z "$left" ] || fail "apt lists or caches left: ${left#"$root"}"

step "interceptd --version"
want="interceptd $(sed -n 's/^__version__ = "\(.*\)"$/\1/p' daemon/interceptd/__init__.py)"
got=$(chroot "$root" interceptd --version)
[ "$got" = "$want" ] || fail "--version said '$got', expected '$want'"
echo "$got"

step "interceptd render --ipv6 off (Istio's sidecar arguments)"
istio_args=(-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020)
chroot "$root" interceptd render --ipv6 off "${istio_args[@]}" >"$cache/render.json"
python3 - "$cache/render.json" <<-'CHECK'
	import json, sys
	document = json.load(open(sys.argv[1]))["nftables"]
	rules = [c["add"]["rule"] for c in document if "rule" in c.get("add", {})]
	assert rules and any("redirect" in json.dumps(r) for r in rules), "no redirect rule rendered"
	print(f"{len(rules)} rules rendered")
	CHECK

# The HEALTHCHECK's command, from the Containerfile's exec-form `HEALTHCHECK ... CMD [...]` line.
healthcheck=$(python3 -c '
import json
for line in open("Containerfile"):
    if line.startswith("HEALTHCHECK"):
        print("\n".join(json.loads(line.split(" CMD ", 1)[1])))
')
[ "$(wc -l <<<"$healthcheck")" -gt 1 ] || fail "no HEALTHCHECK CMD [...] line in Containerfile"

step "as in a pod: only CAP_NET_ADMIN, read-only root, a network namespace of our own"
# The namespaces, the mounts, everything installed in them and every process left (a new PID namespace)
# disappear when unshare exits.
HEALTHCHECK=$healthcheck unshare --net --mount --pid --fork --propagation private -- bash -euc '
	root=$1; shift
	mapfile -t healthcheck <<<"$HEALTHCHECK"
	ip link set lo up
	ip link add d0 type veth peer name d1
	ip addr add 192.0.2.2/24 dev d0
	ip link set d0 up
	mkdir -p "$root/run/interceptd"
	mount --bind "$root" "$root"
	mount -o remount,bind,ro "$root"
	mount -t proc proc "$root/proc"
	mount -t tmpfs -o size=1m tmpfs "$root/run/interceptd"  # the pod spec'"'"'s emptyDir (--state-dir)
	as_pod() { chroot "$root" setpriv --bounding-set=-all,+net_admin --inh-caps=-all -- "$@"; }
	say() { printf "\n-- %s\n" "$*"; }

	say "istio-iptables ARGS, status, cleanup"
	as_pod istio-iptables "$@"
	as_pod interceptd status
	as_pod interceptd cleanup
	if as_pod interceptd status 2>/dev/null; then echo "status after cleanup: table still there" >&2; exit 1; fi

	say "HEALTHCHECK fails while no agent runs"
	if as_pod "${healthcheck[@]}" 2>/dev/null; then echo "healthcheck passed with no agent" >&2; exit 1; fi

	say "interceptd run: HEALTHCHECK and /readyz pass; the rules stay after SIGTERM"
	# Not through as_pod: $! must be the agent itself (chroot and setpriv exec it), not a subshell.
	# The tmpfs is 1777 like an emptyDir (0777): interceptd refuses it and creates its 0700 subdirectory.
	chroot "$root" setpriv --bounding-set=-all,+net_admin --inh-caps=-all -- interceptd run --log-format console \
		--state-dir /run/interceptd/state "$@" &
	agent=$!
	trap "kill $agent 2>/dev/null || true" EXIT
	for _ in $(seq 100); do as_pod "${healthcheck[@]}" 2>/dev/null && break; sleep 0.1; done
	as_pod "${healthcheck[@]}"
	for _ in $(seq 100); do
		as_pod "${healthcheck[0]}" -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:15321/readyz\", timeout=2)" \
			2>/dev/null && break
		sleep 0.1
	done
	as_pod "${healthcheck[0]}" -c "import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:15321/readyz\").read().decode())"
	kill -TERM "$agent"
	wait "$agent" || { echo "the agent exited with status $? on SIGTERM" >&2; exit 1; }
	as_pod interceptd status >/dev/null || { echo "the rules did not survive the agent" >&2; exit 1; }
	as_pod interceptd cleanup
' image-test "$root" "${istio_args[@]}"

step "passed"
