"""cmake --install puts the library, its header, a pkg-config file, the binary and the Lua
runtime files in a prefix, and a host program builds against them with pkg-config alone and
runs a gateway from a config string (the runtime files found under the prefix)."""

import os
import subprocess
import sys
import tempfile
import unittest

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
import harness as h  # noqa: E402

HOST = r"""
#include <sluice.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static void stopped(sluice_t *s, void *arg) { (void)s; *(int *)arg = 1; }

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  uv_loop_t loop;
  uv_loop_init(&loop);
  sluice_t *s;
  sluice_new(&loop, &s);
  static const char cfg[] =
      "return { listen = { '127.0.0.1:0' }, admin = false, watch = false, log_level = 'error',"
      " pools = { p = { endpoints = { 'http://127.0.0.1:9' }, balancer = 'round_robin' } },"
      " routes = { { path = '/', pool = 'p' } } }";
  int rc = sluice_load_string(s, "host.lua", cfg, strlen(cfg), NULL);
  if (rc) { fprintf(stderr, "load: %s\n", sluice_last_error(s)); return 1; }
  if (sluice_start(s)) { fprintf(stderr, "start: %s\n", sluice_last_error(s)); return 1; }
  printf("port %u version %s\n", sluice_port(s), sluice_version());
  int done = 0;
  sluice_stop(s, stopped, &done);
  while (!done) uv_run(&loop, UV_RUN_ONCE);
  sluice_free(s);
  uv_run(&loop, UV_RUN_DEFAULT);
  return uv_loop_close(&loop) ? 1 : 0;
}
"""


class InstallTest(unittest.TestCase):

    def test_install_and_build_a_host_with_pkg_config(self):
        build = os.environ["SLUICE_BUILD_DIR"]
        with tempfile.TemporaryDirectory(prefix="sluice-install-") as tmp:
            prefix = os.path.join(tmp, "prefix")
            subprocess.run(["cmake", "--install", build, "--prefix", prefix], check=True,
                           capture_output=True)
            for rel in ("include/sluice.h", "bin/sluice", "share/sluice/lua/sluice/config.lua",
                        "share/sluice/policies/balancer/round_robin.lua"):
                self.assertTrue(os.path.exists(os.path.join(prefix, rel)), rel)
            libdir = next(os.path.join(prefix, d) for d in ("lib", "lib64", "lib/x86_64-linux-gnu")
                          if os.path.exists(os.path.join(prefix, d, "libsluice.a")))
            env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(libdir, "pkgconfig"))
            flags = subprocess.run(["pkg-config", "--cflags", "--libs", "sluice"], check=True, env=env,
                                   capture_output=True, text=True).stdout.split()
            src = os.path.join(tmp, "host.c")
            with open(src, "w") as f:
                f.write(HOST)
            if os.environ.get("SLUICE_SANITIZED") == "1":  # the library was built with them
                flags = ["-fsanitize=address,undefined"] + flags
            exe = os.path.join(tmp, "host")
            cc = subprocess.run(["cc", "-std=gnu11", "-Wall", "-Werror", "-o", exe, src] + flags,
                                capture_output=True, text=True)
            self.assertEqual(cc.returncode, 0, cc.stderr)
            # the runtime files must come from the prefix, not from this source tree
            env = dict(os.environ, SLUICE_LUA_DIR=os.path.join(prefix, "share/sluice/lua"),
                       SLUICE_POLICY_DIR=os.path.join(prefix, "share/sluice/policies"))
            out = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=30)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertRegex(out.stdout, r"^port [1-9]\d* version \S+")


if __name__ == "__main__":
    unittest.main()
