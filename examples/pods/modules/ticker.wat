;; A long-running "sensor" pod. Once a second it takes a (fake) reading,
;; prints it and appends it to readings.log in its first preopened directory
;; (fd 3, the pod's "data" volume), so the demo shows logs streaming and a
;; volume that keeps its contents across restarts:
;;   tick 1: temperature 21.1 C
;;   tick 2: temperature 21.2 C
;; If readings.log cannot be opened (no volume mounted, say), it says so on
;; stderr and keeps ticking: the readings on stdout are still useful.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)

  ;; Memory map:
  ;;   0..8    iovec           8..12  bytes written   12..16 events / opened fd
  ;;   16..64  the one clock subscription (48 bytes, 8-aligned)
  ;;   64..96  the one event poll_oneoff fills in (32 bytes)
  ;;   96..    constant strings
  ;;   256..   the reading line, built in place after its "tick " prefix
  ;;   320..   the "readings.log: errno N\n" line, likewise
  (data (i32.const 96) "readings.log")
  (data (i32.const 112) "poll_oneoff failed\n")
  (data (i32.const 160) ": temperature 21.")
  (data (i32.const 184) " C\n")
  (data (i32.const 256) "tick ")
  (data (i32.const 320) "readings.log: errno ")

  ;; Writes all of [ptr, ptr+len), retrying short writes; returns a WASI errno.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (local $err i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (local.set $err (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (if (local.get $err) (then (return (local.get $err))))
        ;; A zero-byte write would otherwise loop forever; call it EIO (29).
        (if (i32.eqz (i32.load (i32.const 8))) (then (return (i32.const 29))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more)))
    (i32.const 0))

  ;; Decimal digits of n at dst; returns how many.
  (func $utoa (param $n i32) (param $dst i32) (result i32)
    (local $len i32) (local $t i32)
    ;; Count digits first so they can be filled in from the least significant.
    (local.set $t (local.get $n))
    (loop $count
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $count (local.get $t)))
    (local.set $t (i32.add (local.get $dst) (local.get $len)))
    (loop $digit
      (local.set $t (i32.sub (local.get $t) (i32.const 1)))
      (i32.store8 (local.get $t)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (local.get $len))

  ;; Builds "tick N: temperature 21.D C\n" at 256 and returns its length.
  ;; D is N mod 10: a reading that visibly changes without any real sensor.
  (func $reading (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (i32.add (i32.const 261) (call $utoa (local.get $n) (i32.const 261))))
    (memory.copy (local.get $p) (i32.const 160) (i32.const 17))
    (local.set $p (i32.add (local.get $p) (i32.const 17)))
    (i32.store8 (local.get $p)
      (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
    (memory.copy (i32.add (local.get $p) (i32.const 1)) (i32.const 184) (i32.const 3))
    (i32.sub (i32.add (local.get $p) (i32.const 4)) (i32.const 256)))

  ;; Opening per line (rather than once) means a log rotated or deleted on
  ;; the host is simply recreated, and a failure on one tick is not fatal.
  (func $append (param $ptr i32) (param $len i32)
    (local $err i32) (local $fd i32) (local $n i32)
    (local.set $err
      (call $path_open (i32.const 3) (i32.const 0)     ;; fd 3, don't follow links
                       (i32.const 96) (i32.const 12)   ;; "readings.log"
                       (i32.const 1)                   ;; oflags: CREAT
                       (i64.const 64) (i64.const 0)    ;; rights: fd_write
                       (i32.const 1)                   ;; fdflags: APPEND
                       (i32.const 12)))
    (if (i32.eqz (local.get $err))
      (then
        (local.set $fd (i32.load (i32.const 12)))
        (local.set $err (call $write_all (local.get $fd) (local.get $ptr) (local.get $len)))
        (drop (call $fd_close (local.get $fd)))))
    (if (local.get $err)
      (then
        (local.set $n (call $utoa (local.get $err) (i32.const 340)))
        (i32.store8 (i32.add (i32.const 340) (local.get $n)) (i32.const 10))
        (drop (call $write_all (i32.const 2) (i32.const 320) (i32.add (local.get $n) (i32.const 21)))))))

  (func (export "_start")
    (local $n i32) (local $len i32)

    ;; The subscription never changes, so fill it in once. Untouched fields
    ;; (userdata, precision) stay zero from the initial memory.
    (i32.store8 (i32.const 24) (i32.const 0))             ;; tag: clock
    (i32.store (i32.const 32) (i32.const 1))              ;; clock id: monotonic
    (i64.store (i32.const 40) (i64.const 1_000_000_000))  ;; timeout: 1 s in ns
    (i32.store16 (i32.const 56) (i32.const 0))            ;; flags: relative

    ;; Read first, sleep after: the first line shows up as soon as the pod starts.
    (loop $forever
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $len (call $reading (local.get $n)))
      (drop (call $write_all (i32.const 1) (i32.const 256) (local.get $len)))
      (call $append (i32.const 256) (local.get $len))
      ;; If sleeping fails, carrying on would turn a 1 Hz sensor into a busy
      ;; loop flooding the log; stop loudly and let the restart policy decide.
      (if (i32.or (call $poll_oneoff (i32.const 16) (i32.const 64) (i32.const 1) (i32.const 12))
                  (i32.load16_u (i32.const 72)))          ;; event.error
        (then
          (drop (call $write_all (i32.const 2) (i32.const 112) (i32.const 19)))
          (call $proc_exit (i32.const 1))))
      (br $forever))))
