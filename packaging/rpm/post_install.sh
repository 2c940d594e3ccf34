# hyperfuncd .rpm %post: system user, docker group, config file, unit state.
# rpm runs this with /bin/sh; $1 is the number of installed instances after
# this transaction: 1 on first install, 2 or more on upgrade.
# POSIX sh, idempotent; works without a running systemd (containers).
set -e

UNIT=hyperfuncd.service
USER_NAME=hyperfuncd
STATE_DIR=/var/lib/hyperfuncd
CONFIG=/etc/hyperfuncd/config.toml
REFERENCE=/usr/share/hyperfuncd/config.toml

nologin=/bin/false
for s in /usr/sbin/nologin /sbin/nologin; do
    if [ -x "$s" ]; then nologin=$s; break; fi
done

if ! getent group "$USER_NAME" >/dev/null; then
    groupadd --system "$USER_NAME"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
    # No home is created here: systemd's StateDirectory= makes
    # /var/lib/hyperfuncd, owned by this user, when the unit starts.
    useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
        --shell "$nologin" --comment "hyperfuncd daemon" "$USER_NAME"
fi
# The Docker Engine socket is group docker: the daemon needs that group.
if getent group docker >/dev/null; then
    if ! id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx docker; then
        usermod --append --groups docker "$USER_NAME"
    fi
else
    echo "hyperfuncd: no 'docker' group yet; once Docker is installed run:" >&2
    echo "  usermod -aG docker $USER_NAME && systemctl restart $UNIT" >&2
fi

# The file is %config(noreplace), so rpm installs it and keeps local edits.
# This only brings it back if it was deleted, because the unit passes
# --config with this path and the daemon refuses a missing file.
if [ ! -e "$CONFIG" ] && [ -f "$REFERENCE" ]; then
    mkdir -p "$(dirname "$CONFIG")"
    cp "$REFERENCE" "$CONFIG"
    chmod 0644 "$CONFIG"
fi

# Enable on first install only (an administrator's "disabled" survives
# upgrades); never start here. Restart on upgrade is in %postun.
if [ "${1:-1}" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload enable "$UNIT" >/dev/null 2>&1 || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi

exit 0
