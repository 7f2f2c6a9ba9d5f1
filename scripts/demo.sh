#!/usr/bin/env bash
# The main job end to end on a fresh machine: installs what is missing, then backs up a generated
# sample folder to a local repository, changes it, backs up again, lists, restores and verifies;
# browses every snapshot through `mount-snapshots` and restores by copy; finally mounts the folder
# live, edits it, snapshots with `mkdir .snapshots/NAME`, restores by copy and unmounts.
# Everything happens under a temporary directory (kept with DEMO_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

work=$(mktemp -d /tmp/fsmount-demo.XXXXXX)
[ "${DEMO_KEEP:-}" = 1 ] || trap 'rm -rf "$work"' EXIT
export FSMOUNT_REPOSITORY="$work/repo" FSMOUNT_PASSWORD="demo passphrase" XDG_CACHE_HOME="$work/cache"
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi  # no escapes in a log
step() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; "$@"; }

echo "== a sample folder: $work/projects"
mkdir -p "$work/projects/src" "$work/projects/docs"
for i in $(seq 1 50); do printf 'print("module %d")\n' "$i" > "$work/projects/src/mod$i.py"; done
head -c 20M /dev/urandom > "$work/projects/data.bin"
printf 'Quarterly report\n' > "$work/projects/docs/report.md"
ln -s docs/report.md "$work/projects/README-link"

step fsmount init
step fsmount backup "$work/projects" --tag demo

echo; echo "== change a few things: edit a file, overwrite 4 KiB inside a 20 MiB file, add one, delete one"
printf 'Quarterly report, revised\n' > "$work/projects/docs/report.md"
printf 'XXXX' | dd of="$work/projects/data.bin" bs=4096 seek=1000 conv=notrunc status=none
printf 'new\n' > "$work/projects/src/new.py"
rm "$work/projects/src/mod7.py"
step fsmount backup "$work/projects" --tag demo
step fsmount snapshots

first=$(fsmount snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["short_id"])')
step fsmount ls latest docs
step fsmount restore latest --target "$work/restored"
step diff -r "$work/projects" "$work/restored"
echo "restored copy equals the original"
step fsmount restore "$first" --target "$work/yesterday" docs/report.md
step cat "$work/yesterday/docs/report.md"
step fsmount verify --read-data

echo; echo "== every snapshot as a read-only folder: restoring is a copy"
mkdir "$work/snaps"
step fsmount mount-snapshots "$work/snaps"
step ls -l "$work/snaps"
older=$(ls "$work/snaps" | head -1)
step ls -l "$work/snaps/$older/docs" "$work/snaps/latest/docs"
step cp -a "$work/snaps/$older/docs/report.md" "$work/report-as-it-was.md"
step cat "$work/report-as-it-was.md"
step fsmount umount "$work/snaps"

echo; echo "== the main job: work in a folder that backs itself up as you go"
step fsmount mount "$work/projects"
echo "(mounted over the folder itself: same path, same files)"
printf 'def main():\n    print("hello")\n' > "$work/projects/src/app.py"
printf 'Quarterly report, final\n' > "$work/projects/docs/report.md"
printf 'XXXX' | dd of="$work/projects/data.bin" bs=4096 seek=3000 conv=notrunc status=none
mv "$work/projects/src" "$work/projects/lib"
step fsmount status "$work/projects"
step mkdir "$work/projects/.snapshots/after-refactor"
echo "(that mkdir took a snapshot; .snapshots is hidden from ls -a but reachable by its path)"
printf 'oops, overwritten\n' > "$work/projects/docs/report.md"
step ls -l "$work/projects/.snapshots"
step cp "$work/projects/.snapshots/after-refactor/docs/report.md" "$work/projects/docs/report.md"
step cat "$work/projects/docs/report.md"
step fsmount snapshot "$work/projects" --name from-the-command-line
step fsmount umount "$work/projects"
step fsmount snapshots
step fsmount verify
echo; echo "demo finished: backup, incremental backup, restore, verify, the snapshot mount and a live mount all worked"
