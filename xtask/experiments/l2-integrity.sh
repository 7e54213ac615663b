#!/bin/sh
# Evidence for the nested host's 2-vCPU failures, without any airlock code:
# GUESTS QEMU/KVM guests (Debian's kernel, a busybox initramfs) run at once in
# the nested host, each checking for SECONDS that a 16 MiB file hashes the
# same and that a floating-point sum (SSE2, through awk) comes out the same,
# while a CPU hog forces preemption. Run it inside a nested host:
#   cargo xtask nested --vcpus 2 -- sh xtask/experiments/l2-integrity.sh
# Prints one RESULT line per guest; a mismatch or a guest that dies means
# the nested host corrupted guest state.
set -eu
GUESTS=${GUESTS:-2}
SECONDS_=${SECONDS:-90}
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
work=$(mktemp -d /tmp/l2.XXXXXX)
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev" "$work/root/tmp"
cp /bin/busybox "$work/root/bin/"
cat >"$work/root/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
sum() { awk 'BEGIN { s = 0; for (i = 1; i <= 20000; i++) s += 1 / i; printf "%.15f", s }'; }
ref=\$(md5sum /tmp/data); fref=\$(sum)
end=\$(( \$(cut -d. -f1 /proc/uptime) + $SECONDS_ ))
n=0; bad=0
( while :; do :; done ) &
while [ \$(cut -d. -f1 /proc/uptime) -lt \$end ]; do
  n=\$((n + 1))
  [ "\$(md5sum /tmp/data)" = "\$ref" ] || { bad=\$((bad + 1)); echo "MISMATCH md5 at check \$n"; }
  [ "\$(sum)" = "\$fref" ] || { bad=\$((bad + 1)); echo "MISMATCH float at check \$n"; }
done
echo "RESULT checks=\$n mismatches=\$bad"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio --quiet -o -H newc >"$work/initramfs.cpio")
i=0
while [ "$i" -lt "$GUESTS" ]; do
  qemu-system-x86_64 -accel kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config \
    -display none -no-reboot -serial "file:$work/guest$i.log" \
    -kernel "$kernel" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 quiet panic=-1" &
  i=$((i + 1))
done
wait
i=0
while [ "$i" -lt "$GUESTS" ]; do
  echo "guest $i: $(grep -E 'RESULT|MISMATCH|Kernel panic|segfault|general protection|BUG|Oops' "$work/guest$i.log" | tr '\n' ' ')"
  grep -q 'RESULT' "$work/guest$i.log" || { echo "guest $i ended without a result; its console:"; tail -n 15 "$work/guest$i.log"; }
  i=$((i + 1))
done
rm -rf "$work"
