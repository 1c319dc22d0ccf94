;; Lichen's hello-world pod. It greets with its arguments and shows the
;; GREETING* environment variables from the pod spec, to show that args and
;; env flow from the manifest into the module:
;;   hello from Lichen: edge world
;;   GREETING_LANG=en
;; then exits 0 (by returning from _start), so restartPolicy OnFailure leaves
;; it Succeeded.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)

  ;; Memory map:
  ;;   0..8    iovec for $print        8..12  bytes written
  ;;   16..24  argc, argv buffer size  24..32 envc, environ buffer size
  ;;   64..    constant strings
  ;;   1024..  argv and environ, sized at run time ($reserve grows memory)
  (data (i32.const 64) "hello from Lichen:")
  (data (i32.const 88) " \n")
  (data (i32.const 96) "GREETING")

  ;; Writes all of [ptr, ptr+len) to fd, retrying short writes. Errors are
  ;; ignored: if our own stdout is broken there is nobody left to tell.
  (func $print (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        ;; A zero-byte write would otherwise loop forever.
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  ;; argv/environ size calls cannot really fail, but if they did we would
  ;; print garbage; a distinctive exit code (70, EX_SOFTWARE) is more honest.
  (func $must (param $errno i32)
    (if (local.get $errno) (then (call $proc_exit (i32.const 70)))))

  ;; Makes sure [0, end) is addressable: argv and environ can be any size.
  (func $reserve (param $end i32)
    (local $have i32)
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.shr_u
                      (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 0xffff))
                      (i32.const 16)))
                    (i32.const -1))
          (then (call $proc_exit (i32.const 70)))))))

  ;; WASI pointer arrays must be 4-byte aligned or the host rejects them.
  (func $align4 (param $p i32) (result i32)
    (i32.and (i32.add (local.get $p) (i32.const 3)) (i32.const -4)))

  (func $strlen (param $s i32) (result i32)
    (local $p i32)
    (local.set $p (local.get $s))
    (block $end
      (loop $scan
        (br_if $end (i32.eqz (i32.load8_u (local.get $p))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $scan)))
    (i32.sub (local.get $p) (local.get $s)))

  ;; Byte-by-byte so a short entry stops at its NUL instead of reading past it.
  (func $starts_with (param $s i32) (param $prefix i32) (param $n i32) (result i32)
    (local $i i32)
    (block $no
      (loop $cmp
        (if (i32.ge_u (local.get $i) (local.get $n)) (then (return (i32.const 1))))
        (br_if $no (i32.ne (i32.load8_u (i32.add (local.get $s) (local.get $i)))
                           (i32.load8_u (i32.add (local.get $prefix) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $cmp)))
    (i32.const 0))

  (func (export "_start")
    (local $argc i32) (local $argv i32)
    (local $envc i32) (local $envp i32)
    (local $heap i32) (local $i i32) (local $s i32)

    ;; argv: pointer array first, then the NUL-terminated strings.
    (call $must (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $argc (i32.load (i32.const 16)))
    (local.set $argv (i32.const 1024))
    (local.set $heap (i32.add (local.get $argv) (i32.shl (local.get $argc) (i32.const 2))))
    (call $reserve (i32.add (local.get $heap) (i32.load (i32.const 20))))
    (call $must (call $args_get (local.get $argv) (local.get $heap)))
    (local.set $heap (i32.add (local.get $heap) (i32.load (i32.const 20))))

    ;; environ: same shape, placed after argv.
    (call $must (call $environ_sizes_get (i32.const 24) (i32.const 28)))
    (local.set $envc (i32.load (i32.const 24)))
    (local.set $envp (call $align4 (local.get $heap)))
    (local.set $heap (i32.add (local.get $envp) (i32.shl (local.get $envc) (i32.const 2))))
    (call $reserve (i32.add (local.get $heap) (i32.load (i32.const 28))))
    (call $must (call $environ_get (local.get $envp) (local.get $heap)))

    ;; The greeting, then " ARG" for every argument after the program name.
    (call $print (i32.const 1) (i32.const 64) (i32.const 18))
    (local.set $i (i32.const 1))
    (block $args_done
      (loop $args
        (br_if $args_done (i32.ge_u (local.get $i) (local.get $argc)))
        (local.set $s (i32.load (i32.add (local.get $argv) (i32.shl (local.get $i) (i32.const 2)))))
        (call $print (i32.const 1) (i32.const 88) (i32.const 1))
        (call $print (i32.const 1) (local.get $s) (call $strlen (local.get $s)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $args)))
    (call $print (i32.const 1) (i32.const 89) (i32.const 1))

    ;; Entries are already "NAME=value"; '=' cannot appear in the prefix, so
    ;; matching the entry's start is the same as matching the name's start.
    (local.set $i (i32.const 0))
    (block $env_done
      (loop $env
        (br_if $env_done (i32.ge_u (local.get $i) (local.get $envc)))
        (local.set $s (i32.load (i32.add (local.get $envp) (i32.shl (local.get $i) (i32.const 2)))))
        (if (call $starts_with (local.get $s) (i32.const 96) (i32.const 8))
          (then
            (call $print (i32.const 1) (local.get $s) (call $strlen (local.get $s)))
            (call $print (i32.const 1) (i32.const 89) (i32.const 1))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $env)))))
