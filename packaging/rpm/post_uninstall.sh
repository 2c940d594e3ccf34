# hyperfuncd .rpm %postun: reload units; on upgrade ($1 >= 1) restart a
# running daemon onto the new binary. On erase ($1 = 0) the state in
# /var/lib/hyperfuncd and the system user are kept (rpm has no "purge";
# delete them by hand if wanted). A modified config is saved as .rpmsave.
# The package's own directories are rpm's to remove (the spec lists them).
set -e

UNIT=hyperfuncd.service

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "${1:-0}" -ge 1 ]; then
        systemctl try-restart "$UNIT" >/dev/null 2>&1 || true
    fi
fi

exit 0
