;; A runaway pod for the fuel demo: says what it is about to do, then burns
;; CPU forever. With the lichen.dev/fuel annotation the host stops it with
;; OutOfFuel instead of letting it hog the device.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)

  ;; 0..8: one iovec, 8..12: bytes written (unused), 16..: the message.
  (data (i32.const 16) "spinning until fuel runs out\n")

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 29))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (loop $spin
      (br $spin))))
