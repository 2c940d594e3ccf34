# hyperfuncd .rpm %postun: reload units; on upgrade ($1 >= 1) restart a
# running daemon onto the new binary. On erase ($1 = 0) the state in
# /var/lib/hyperfuncd and the system user are kept (rpm has no "purge";
# delete them by hand if wanted). A modified config is saved as .rpmsave.
set -e

UNIT=hyperfuncd.service

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    if [ "${1:-0}" -ge 1 ]; then
        systemctl try-restart "$UNIT" >/dev/null 2>&1 || true
    fi
fi

# On erase, the package's own directories go with it unless something is
# left in them (a config.toml.rpmsave stays, and so does its directory).
# The rpm cannot own them: cargo-generate-rpm 0.21's directory entries
# (`dir = true`) fail the build (it stats an empty source path).
if [ "${1:-0}" -eq 0 ]; then
    rmdir /etc/hyperfuncd /usr/share/hyperfuncd /usr/share/doc/hyperfuncd 2>/dev/null || true
fi

exit 0
