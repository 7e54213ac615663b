#!/bin/sh
# Evidence that an unpaced serial-console flood from an L2 guest freezes the
# nested test host (QEMU TCG with emulated SVM) with no airlock code involved:
# run as `cargo xtask nested --timeout 130s -- xtask/experiments/console-flood.sh ~/.cache/airlock/images/<hash>`.
# The uptime lines stop after ~20 s of the flood; the same happens with airlock's VMM.
img=${1:?usage: console-flood.sh IMAGE_DIR (run it with cargo xtask nested)}
d=$(mktemp -d)
qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off -enable-kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config -display none \
  -serial file:$d/console.log -kernel $img/vmlinux -append "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootfstype=ext4 init=/usr/bin/yes" \
  -drive id=root,file=$img/rootfs.ext4,format=raw,if=none,readonly=on -device virtio-blk-device,drive=root </dev/null >/dev/null 2>$d/err &
for i in $(seq 1 14); do sleep 5; echo "t=$i uptime=$(cut -d' ' -f1 /proc/uptime) log=$(stat -c %s $d/console.log)"; done
kill %1; tail -3 $d/err
