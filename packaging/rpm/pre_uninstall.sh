# hyperfuncd .rpm %preun: on erase ($1 = 0) stop and disable the unit.
# On upgrade ($1 >= 1) the daemon keeps running; %postun restarts it.
set -e

UNIT=hyperfuncd.service

if [ "${1:-0}" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        systemctl stop "$UNIT" >/dev/null 2>&1 || true
    fi
    systemctl --no-reload disable "$UNIT" >/dev/null 2>&1 || true
fi

exit 0
