// gguf_check FILE...: opens each file through the C ABI and prints one line per file:
//   "ok <n_tensors> <n_kv>"  or  "error <code> <message>".
// gguf_check -d FILE: dumps every key through the typed getters, one line each: key<TAB>u32-or-dash<TAB>kind<TAB>value
//   (kind: int, float, bool, string, ints, floats, strings, other; lists joined by \x1f).
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

static int dump(const char *path) {
    std::string err;
    auto g = ds4::GGUF::open(path, &err);
    if (!g) {
        std::printf("error %s\n", err.c_str());
        return 1;
    }
    for (const ds4::KVInfo &kv : g->kvs()) {
        int64_t i;
        double f;
        bool b;
        std::string s;
        std::vector<int64_t> vi;
        std::vector<float> vf;
        std::vector<std::string> vs;
        uint32_t u;
        std::printf("%s\t%s\t", kv.key.c_str(), g->get_u32(kv.key, &u) ? std::to_string(u).c_str() : "-");
        if (g->get_bool(kv.key, &b)) {
            std::printf("bool\t%d", (int)b);
        } else if (g->get_i64(kv.key, &i)) {
            std::printf("int\t%lld", (long long)i);
        } else if (g->get_f64(kv.key, &f)) {
            std::printf("float\t%.17g", f);
        } else if (g->get_string(kv.key, &s)) {
            std::printf("string\t%s", s.c_str());
        } else if (g->get_ints(kv.key, &vi)) {
            std::printf("ints\t");
            for (size_t k = 0; k < vi.size(); k++) std::printf("%s%lld", k ? "\x1f" : "", (long long)vi[k]);
        } else if (g->get_floats(kv.key, &vf)) {
            std::printf("floats\t");
            for (size_t k = 0; k < vf.size(); k++) std::printf("%s%.9g", k ? "\x1f" : "", (double)vf[k]);
        } else if (g->get_strings(kv.key, &vs)) {
            std::printf("strings\t");
            for (size_t k = 0; k < vs.size(); k++) std::printf("%s%s", k ? "\x1f" : "", vs[k].c_str());
        } else {
            std::printf("other\t%s/%llu", ds4::gguf_value_type_name(kv.type), (unsigned long long)g->array_len(kv.key));
        }
        std::printf("\n");
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && std::strcmp(argv[1], "-d") == 0) return dump(argv[2]);
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
