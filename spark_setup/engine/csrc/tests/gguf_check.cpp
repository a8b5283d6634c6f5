// gguf_check FILE...: opens each file through the C ABI and prints one line per file:
//   "ok <n_tensors> <n_kv>"  or  "error <code> <message>".
// With -s it also reads every metadata value and touches every tensor's first and last byte (so a sanitizer
// build proves the bounds checks cover what the getters and data() hand out). Driver of the fuzz test.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ds4.h"
#include "gguf.h"

static unsigned touch(const ds4::GGUF &g) {
    unsigned acc = 0;
    for (const ds4::KVInfo &kv : g.kvs()) {
        int64_t i;
        double f;
        bool b;
        std::string s;
        std::vector<int64_t> vi;
        std::vector<float> vf;
        std::vector<std::string> vs;
        acc += g.get_i64(kv.key, &i) ? (unsigned)i : 0u;
        acc += g.get_f64(kv.key, &f) ? 1u : 0u;
        acc += g.get_bool(kv.key, &b) ? (unsigned)b : 0u;
        acc += g.get_string(kv.key, &s) ? (unsigned)s.size() : 0u;
        acc += g.get_ints(kv.key, &vi) ? (unsigned)vi.size() : 0u;
        acc += g.get_floats(kv.key, &vf) ? (unsigned)vf.size() : 0u;
        acc += g.get_strings(kv.key, &vs) ? (unsigned)vs.size() : 0u;
    }
    for (const ds4::TensorInfo &t : g.tensors()) {
        const uint8_t *p = g.data(t);
        acc += p[0] + p[t.nbytes - 1];
    }
    return acc;
}

int main(int argc, char **argv) {
    bool deep = false;
    int first = 1;
    if (argc > 1 && std::strcmp(argv[1], "-s") == 0) {
        deep = true;
        first = 2;
    }
    for (int i = first; i < argc; i++) {
        ds4_gguf *g = nullptr;
        int rc = ds4_gguf_open(argv[i], &g);
        if (rc != DS4_OK) {
            std::printf("error %d %s\n", rc, ds4_last_error());
            continue;
        }
        if (deep) {
            std::string err;
            auto gg = ds4::GGUF::open(argv[i], &err);
            if (gg) (void)touch(*gg);
        }
        std::printf("ok %lld %lld\n", (long long)ds4_gguf_n_tensors(g), (long long)ds4_gguf_n_kv(g));
        ds4_gguf_close(g);
    }
    return 0;
}
