#!/bin/sh
# /init of the lab microVM (busybox sh as PID 1). Built into the initramfs by lab/microvm.py.
#
# Mounts the host's root read-only (9p tag "host") and the run directory writable (9p tag
# "out"), makes the run directory appear at its host path inside the host root, chroots into
# the host root to run $RUN_DIR/cmd.sh, stores its output and exit status in the run
# directory, and powers off. Kernel module requests (auto-loading for `ip link add type
# veth`, nftables expressions, crc32c for ip_vs ...) are served from the module tree in the
# lab cache through /sbin/modprobe-host, because the host root has no /lib/modules.

/bin/busybox --install -s /bin
export PATH=/bin:/sbin

die() {
    echo "microvm-init: $*" >&2
    echo "microvm-init: $*" > /dev/console
    poweroff -f
}

mkdir -p /proc /sys /dev /host /out /sbin /tmp /keep
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/modules/$module" || die "insmod $module failed"
done < /modules.order

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose host /host \
    || die "cannot mount the host root over 9p"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out \
    || die "cannot mount the run directory over 9p"
[ -r /out/vm.env ] || die "no vm.env in the run directory"
. /out/vm.env  # RUN_DIR, MODULE_ROOT, PRESERVE

# Paths the run needs (repo, venv, module tree) that lie under a directory about to get an
# empty tmpfs, e.g. a CI checkout in /tmp: keep them visible through bind mounts.
i=0
for path in $PRESERVE; do
    mkdir -p "/keep/$i" && mount --bind "/host$path" "/keep/$i" || die "cannot keep $path"
    i=$((i + 1))
done

mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
for dir in /host/run /host/tmp /host/var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "$dir"
done

i=0
for path in $PRESERVE; do
    mkdir -p "/host$path" && mount --bind "/keep/$i" "/host$path" || die "cannot restore $path"
    i=$((i + 1))
done
mkdir -p "/host$RUN_DIR" 2>/dev/null
mount --bind /out "/host$RUN_DIR" || die "cannot bind the run directory to $RUN_DIR"

printf '#!/bin/sh\nexec /bin/chroot /host /sbin/modprobe -d "%s" "$@"\n' "$MODULE_ROOT" > /sbin/modprobe-host
chmod 755 /sbin/modprobe-host
echo /sbin/modprobe-host > /proc/sys/kernel/modprobe

hostname pop-microvm
ip link set lo up

read -r started _ < /proc/uptime
chroot /host /usr/bin/env -i /bin/sh "$RUN_DIR/cmd.sh" > /out/output 2>&1 < /dev/null
rc=$?
read -r ended _ < /proc/uptime
echo "$started $ended" > /out/uptime
echo "$rc" > /out/rc
sync
echo "microvm-init: command exited $rc" > /dev/console
poweroff -f
