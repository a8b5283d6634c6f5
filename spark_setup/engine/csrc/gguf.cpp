// gguf.cpp: GGUF v3 reader (format facts: ds4-model-facts.md section I; gguf spec).
//
// The whole file is mapped read-only. parse() walks header, key/values and the tensor table with a cursor that
// checks every read against the file size, and checks every tensor's [offset, offset + nbytes) against it too,
// so nothing after a successful open can read outside the mapping.
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "quant.h"

namespace ds4 {

static_assert(sizeof(float) == 4 && sizeof(double) == 8, "IEEE floats expected");

const char *gguf_value_type_name(uint32_t t) {
    static const char *names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                                  "u64", "i64", "f64"};
    return t < 13 ? names[t] : "?";
}

namespace {

constexpr uint32_t kMagic = 0x46554747u;  // "GGUF" little-endian
constexpr uint64_t kMaxKeyLen = 65535;
constexpr uint64_t kMaxNameLen = 256;
constexpr int kMaxArrayDepth = 4;

size_t scalar_size(uint32_t t) {
    switch (t) {
        case GGUF_U8: case GGUF_I8: case GGUF_BOOL: return 1;
        case GGUF_U16: case GGUF_I16: return 2;
        case GGUF_U32: case GGUF_I32: case GGUF_F32: return 4;
        case GGUF_U64: case GGUF_I64: case GGUF_F64: return 8;
        default: return 0;  // string, array, unknown
    }
}

template <class T>
T load(const uint8_t *p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

// Bounds-checked cursor over the mapping. Every read either succeeds or records an error and returns false.
struct Cursor {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos;
    std::string err;

    bool need(uint64_t n, const char *what) {
        if (n > size - pos) {
            err = strfmt("truncated file: %s at offset %llu needs %llu bytes, only %llu left", what,
                         (unsigned long long)pos, (unsigned long long)n, (unsigned long long)(size - pos));
            return false;
        }
        return true;
    }
    bool u32(uint32_t *v, const char *what) {
        if (!need(4, what)) return false;
        *v = load<uint32_t>(base + pos);
        pos += 4;
        return true;
    }
    bool u64(uint64_t *v, const char *what) {
        if (!need(8, what)) return false;
        *v = load<uint64_t>(base + pos);
        pos += 8;
        return true;
    }
    // Reads a GGUF string (u64 length + bytes) without copying; returns its start in *start.
    bool str(uint64_t *start, uint64_t *len, uint64_t max_len, const char *what) {
        if (!u64(len, what)) return false;
        if (*len > max_len) {
            err = strfmt("%s at offset %llu has length %llu (limit %llu)", what, (unsigned long long)(pos - 8),
                         (unsigned long long)*len, (unsigned long long)max_len);
            return false;
        }
        if (!need(*len, what)) return false;
        *start = pos;
        pos += *len;
        return true;
    }
    bool skip(uint64_t n, const char *what) {
        if (!need(n, what)) return false;
        pos += n;
        return true;
    }
};

// Skips (and validates) one value of type t at the cursor.
bool skip_value(Cursor &c, uint32_t t, int depth, const std::string &key) {
    if (t == GGUF_STRING) {
        uint64_t s, n;
        return c.str(&s, &n, std::numeric_limits<uint64_t>::max(), "string value");
    }
    if (t == GGUF_BOOL) {
        if (!c.need(1, "bool value")) return false;
        uint8_t b = c.base[c.pos];
        if (b > 1) {
            c.err = strfmt("key '%s': bool value %u is not 0 or 1", key.c_str(), b);
            return false;
        }
        c.pos += 1;
        return true;
    }
    if (t == GGUF_ARRAY) {
        if (depth >= kMaxArrayDepth) {
            c.err = strfmt("key '%s': arrays nested deeper than %d", key.c_str(), kMaxArrayDepth);
            return false;
        }
        uint32_t et;
        uint64_t n;
        if (!c.u32(&et, "array element type") || !c.u64(&n, "array length")) return false;
        if (et > GGUF_F64) {
            c.err = strfmt("key '%s': unknown array element type %u", key.c_str(), et);
            return false;
        }
        size_t es = scalar_size(et);
        if (es != 0 && et != GGUF_BOOL) {
            if (n > (c.size - c.pos) / es) {
                c.err = strfmt("truncated file: key '%s' array of %llu %s runs past the end of the file", key.c_str(),
                               (unsigned long long)n, gguf_value_type_name(et));
                return false;
            }
            c.pos += n * es;
            return true;
        }
        // Strings take >= 8 bytes each, nested arrays >= 12, bools 1: reject impossible counts before looping.
        uint64_t min_size = et == GGUF_STRING ? 8 : et == GGUF_ARRAY ? 12 : 1;
        if (n > (c.size - c.pos) / min_size) {
            c.err = strfmt("truncated file: key '%s' array of %llu %s runs past the end of the file", key.c_str(),
                           (unsigned long long)n, gguf_value_type_name(et));
            return false;
        }
        for (uint64_t i = 0; i < n; i++)
            if (!skip_value(c, et, depth + 1, key)) return false;
        return true;
    }
    size_t s = scalar_size(t);
    if (s == 0) {
        c.err = strfmt("key '%s': unknown value type %u", key.c_str(), t);
        return false;
    }
    return c.skip(s, "scalar value");
}

// Integer value of a scalar at p of type t. Returns false if t is not an integer type.
// u64 values above INT64_MAX are reported through *big (and *v is unspecified).
bool read_int(const uint8_t *p, uint32_t t, int64_t *v, uint64_t *uv, bool *is_u64) {
    *is_u64 = false;
    switch (t) {
        case GGUF_U8: *v = load<uint8_t>(p); break;
        case GGUF_I8: *v = load<int8_t>(p); break;
        case GGUF_U16: *v = load<uint16_t>(p); break;
        case GGUF_I16: *v = load<int16_t>(p); break;
        case GGUF_U32: *v = load<uint32_t>(p); break;
        case GGUF_I32: *v = load<int32_t>(p); break;
        case GGUF_I64: *v = load<int64_t>(p); break;
        case GGUF_U64: *uv = load<uint64_t>(p); *is_u64 = true; return true;
        default: return false;
    }
    return true;
}

bool to_i64(const uint8_t *p, uint32_t t, int64_t *out) {
    int64_t v = 0;
    uint64_t uv = 0;
    bool is_u64;
    if (!read_int(p, t, &v, &uv, &is_u64)) return false;
    if (is_u64) {
        if (uv > (uint64_t)std::numeric_limits<int64_t>::max()) return false;
        v = (int64_t)uv;
    }
    *out = v;
    return true;
}

bool to_f64(const uint8_t *p, uint32_t t, double *out) {
    if (t == GGUF_F32) {
        *out = load<float>(p);
        return true;
    }
    if (t == GGUF_F64) {
        *out = load<double>(p);
        return true;
    }
    int64_t v = 0;
    uint64_t uv = 0;
    bool is_u64;
    if (!read_int(p, t, &v, &uv, &is_u64)) return false;
    *out = is_u64 ? (double)uv : (double)v;
    return true;
}

}  // namespace

std::unique_ptr<GGUF> GGUF::open(const std::string &path, std::string *err, int *code) {
    auto fail_with = [&](int c, const std::string &msg) -> std::unique_ptr<GGUF> {
        if (err) *err = msg;
        if (code) *code = c;
        return nullptr;
    };
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail_with(DS4_E_IO, strfmt("cannot open %s: %s", path.c_str(), std::strerror(errno)));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        return fail_with(DS4_E_IO, strfmt("cannot stat %s: %s", path.c_str(), std::strerror(e)));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        return fail_with(DS4_E_IO, strfmt("%s is not a regular file", path.c_str()));
    }
    if (st.st_size < 24) {
        ::close(fd);
        return fail_with(DS4_E_FORMAT, strfmt("%s is not a GGUF file: %lld bytes is shorter than the 24-byte header",
                                              path.c_str(), (long long)st.st_size));
    }
    void *m = mmap(nullptr, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
        int e = errno;
        ::close(fd);
        return fail_with(DS4_E_IO, strfmt("cannot mmap %s: %s", path.c_str(), std::strerror(e)));
    }
    std::unique_ptr<GGUF> g(new GGUF());
    g->path_ = path;
    g->fd_ = fd;
    g->base_ = static_cast<const uint8_t *>(m);
    g->size_ = (uint64_t)st.st_size;
    std::string perr;
    if (!g->parse(&perr)) return fail_with(DS4_E_FORMAT, strfmt("%s: %s", path.c_str(), perr.c_str()));
    return g;
}

GGUF::~GGUF() {
    if (base_) munmap(const_cast<uint8_t *>(base_), (size_t)size_);
    if (fd_ >= 0) ::close(fd_);
}

bool GGUF::parse(std::string *err) {
    Cursor c{base_, size_, 0, {}};
    auto bad = [&](const std::string &m) {
        *err = m;
        return false;
    };
    uint32_t magic;
    if (!c.u32(&magic, "magic")) return bad(c.err);
    if (magic != kMagic) return bad("not a GGUF file (bad magic)");
    if (!c.u32(&version_, "version")) return bad(c.err);
    if (version_ != 3) return bad(strfmt("GGUF version %u is not supported (need version 3)", version_));
    uint64_t n_tensors, n_kv;
    if (!c.u64(&n_tensors, "tensor count") || !c.u64(&n_kv, "key/value count")) return bad(c.err);
    // A key/value takes >= 13 bytes and a tensor info >= 32: reject counts the file cannot hold.
    if (n_kv > (size_ - c.pos) / 13)
        return bad(strfmt("key/value count %llu is impossible for a %llu-byte file", (unsigned long long)n_kv,
                          (unsigned long long)size_));
    if (n_tensors > (size_ - c.pos) / 32)
        return bad(strfmt("tensor count %llu is impossible for a %llu-byte file", (unsigned long long)n_tensors,
                          (unsigned long long)size_));

    kvs_.reserve((size_t)n_kv);
    for (uint64_t i = 0; i < n_kv; i++) {
        uint64_t ks, kl;
        if (!c.str(&ks, &kl, kMaxKeyLen, "key")) return bad(strfmt("key/value %llu: %s", (unsigned long long)i, c.err.c_str()));
        KVInfo kv;
        kv.key.assign(reinterpret_cast<const char *>(base_ + ks), (size_t)kl);
        if (kv.key.empty()) return bad(strfmt("key/value %llu has an empty key", (unsigned long long)i));
        if (!c.u32(&kv.type, "value type")) return bad(c.err);
        if (kv.type > GGUF_F64) return bad(strfmt("key '%s': unknown value type %u", kv.key.c_str(), kv.type));
        if (kv.type == GGUF_ARRAY) {
            uint64_t save = c.pos;
            if (!c.u32(&kv.arr_type, "array element type") || !c.u64(&kv.arr_n, "array length")) return bad(c.err);
            kv.value_off = c.pos;
            c.pos = save;
        } else {
            kv.value_off = c.pos;
        }
        if (!skip_value(c, kv.type, 0, kv.key)) return bad(c.err);
        if (kv_index_.count(kv.key)) return bad(strfmt("duplicate key '%s'", kv.key.c_str()));
        kv_index_.emplace(kv.key, kvs_.size());
        kvs_.push_back(std::move(kv));
    }

    if (const KVInfo *a = kv("general.alignment")) {
        if (a->type != GGUF_U32) return bad(strfmt("general.alignment has type %s, expected u32", gguf_value_type_name(a->type)));
        uint32_t al = load<uint32_t>(base_ + a->value_off);
        if (al == 0 || (al & (al - 1)) != 0) return bad(strfmt("general.alignment %u is not a power of two", al));
        alignment_ = al;
    }

    tensors_.reserve((size_t)n_tensors);
    for (uint64_t i = 0; i < n_tensors; i++) {
        TensorInfo ti;
        uint64_t ns, nl;
        if (!c.str(&ns, &nl, kMaxNameLen, "tensor name")) return bad(strfmt("tensor %llu: %s", (unsigned long long)i, c.err.c_str()));
        ti.name.assign(reinterpret_cast<const char *>(base_ + ns), (size_t)nl);
        uint32_t nd;
        if (!c.u32(&nd, "tensor n_dims")) return bad(c.err);
        if (nd < 1 || nd > 4) return bad(strfmt("tensor '%s' has %u dimensions (supported: 1 to 4)", ti.name.c_str(), nd));
        ti.n_dims = (int32_t)nd;
        uint64_t n_el = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t ne;
            if (!c.u64(&ne, "tensor dimension")) return bad(c.err);
            if (ne == 0 || ne > (1ull << 40)) return bad(strfmt("tensor '%s' has invalid dimension %u = %llu", ti.name.c_str(), d, (unsigned long long)ne));
            if (n_el > (1ull << 60) / ne) return bad(strfmt("tensor '%s' has too many elements", ti.name.c_str()));
            n_el *= ne;
            ti.ne[d] = (int64_t)ne;
        }
        uint32_t type;
        if (!c.u32(&type, "tensor type")) return bad(c.err);
        int64_t bs = block_size((int)type);
        if (bs == 0) return bad(strfmt("tensor '%s' has unknown type %u", ti.name.c_str(), type));
        ti.type = (int32_t)type;
        if (ti.ne[0] % bs != 0)
            return bad(strfmt("tensor '%s': row length %lld is not a multiple of the %s block size %lld", ti.name.c_str(),
                              (long long)ti.ne[0], type_name((int)type), (long long)bs));
        ti.nbytes = (n_el / (uint64_t)bs) * (uint64_t)type_size((int)type);
        uint64_t off;
        if (!c.u64(&off, "tensor offset")) return bad(c.err);
        if (off % alignment_ != 0)
            return bad(strfmt("tensor '%s' offset %llu is not a multiple of the alignment %u", ti.name.c_str(),
                              (unsigned long long)off, alignment_));
        ti.offset = off;  // relative for now; made absolute below
        if (tensor_index_.count(ti.name)) return bad(strfmt("duplicate tensor name '%s'", ti.name.c_str()));
        tensor_index_.emplace(ti.name, tensors_.size());
        tensors_.push_back(std::move(ti));
    }

    uint64_t pad = (alignment_ - c.pos % alignment_) % alignment_;
    data_offset_ = c.pos + pad;  // c.pos <= size_ < 2^63, no overflow
    if (!tensors_.empty() && data_offset_ > size_)
        return bad(strfmt("truncated file: data section starts at %llu, past the end of the file (%llu bytes)",
                          (unsigned long long)data_offset_, (unsigned long long)size_));
    for (TensorInfo &ti : tensors_) {
        uint64_t avail = size_ - data_offset_;
        if (ti.offset > avail || ti.nbytes > avail - ti.offset)
            return bad(strfmt("truncated file: tensor '%s' [%llu, +%llu) runs past the end of the data section (%llu bytes)",
                              ti.name.c_str(), (unsigned long long)ti.offset, (unsigned long long)ti.nbytes,
                              (unsigned long long)avail));
        ti.offset += data_offset_;
    }
    return true;
}

const KVInfo *GGUF::kv(const std::string &key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kvs_[it->second];
}

const TensorInfo *GGUF::find(const std::string &name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

bool GGUF::get_i64(const std::string &key, int64_t *out) const {
    const KVInfo *k = kv(key);
    if (!k) return false;
    int64_t v;
    if (!to_i64(base_ + k->value_off, k->type, &v)) return false;
    *out = v;
    return true;
}

bool GGUF::get_u32(const std::string &key, uint32_t *out) const {
    int64_t v;
    if (!get_i64(key, &v) || v < 0 || v > (int64_t)std::numeric_limits<uint32_t>::max()) return false;
    *out = (uint32_t)v;
    return true;
}

bool GGUF::get_f64(const std::string &key, double *out) const {
    const KVInfo *k = kv(key);
    if (!k) return false;
    return to_f64(base_ + k->value_off, k->type, out);
}

bool GGUF::get_bool(const std::string &key, bool *out) const {
    const KVInfo *k = kv(key);
    if (!k || k->type != GGUF_BOOL) return false;
    *out = base_[k->value_off] != 0;
    return true;
}

bool GGUF::get_string(const std::string &key, std::string *out) const {
    const KVInfo *k = kv(key);
    if (!k || k->type != GGUF_STRING) return false;
    uint64_t len = load<uint64_t>(base_ + k->value_off);
    out->assign(reinterpret_cast<const char *>(base_ + k->value_off + 8), (size_t)len);
    return true;
}

uint64_t GGUF::array_len(const std::string &key) const {
    const KVInfo *k = kv(key);
    return (k && k->type == GGUF_ARRAY) ? k->arr_n : 0;
}

bool GGUF::get_ints(const std::string &key, std::vector<int64_t> *out) const {
    const KVInfo *k = kv(key);
    if (!k || k->type != GGUF_ARRAY) return false;
    size_t es = scalar_size(k->arr_type);
    if (es == 0 || k->arr_type == GGUF_BOOL || k->arr_type == GGUF_F32 || k->arr_type == GGUF_F64) return false;
    std::vector<int64_t> v((size_t)k->arr_n);
    for (uint64_t i = 0; i < k->arr_n; i++)
        if (!to_i64(base_ + k->value_off + i * es, k->arr_type, &v[(size_t)i])) return false;
    *out = std::move(v);
    return true;
}

bool GGUF::get_floats(const std::string &key, std::vector<float> *out) const {
    const KVInfo *k = kv(key);
    if (!k || k->type != GGUF_ARRAY) return false;
    size_t es = scalar_size(k->arr_type);
    if (es == 0 || k->arr_type == GGUF_BOOL) return false;
    std::vector<float> v((size_t)k->arr_n);
    for (uint64_t i = 0; i < k->arr_n; i++) {
        double d;
        if (!to_f64(base_ + k->value_off + i * es, k->arr_type, &d)) return false;
        v[(size_t)i] = (float)d;
    }
    *out = std::move(v);
    return true;
}

bool GGUF::get_strings(const std::string &key, std::vector<std::string> *out) const {
    const KVInfo *k = kv(key);
    if (!k || k->type != GGUF_ARRAY || k->arr_type != GGUF_STRING) return false;
    std::vector<std::string> v;
    v.reserve((size_t)k->arr_n);
    uint64_t p = k->value_off;  // validated at open: every string lies inside the file
    for (uint64_t i = 0; i < k->arr_n; i++) {
        uint64_t len = load<uint64_t>(base_ + p);
        v.emplace_back(reinterpret_cast<const char *>(base_ + p + 8), (size_t)len);
        p += 8 + len;
    }
    *out = std::move(v);
    return true;
}

static std::string kv_desc(const GGUF &g, const std::string &key, const char *want) {
    const KVInfo *k = g.kv(key);
    if (!k) return strfmt("GGUF key '%s' is missing", key.c_str());
    return strfmt("GGUF key '%s' has type %s, expected %s (or value out of range)", key.c_str(),
                  gguf_value_type_name(k->type), want);
}

uint32_t GGUF::require_u32(const std::string &key) const {
    uint32_t v;
    if (!get_u32(key, &v)) throw Error(DS4_E_MODEL, kv_desc(*this, key, "u32"));
    return v;
}
int64_t GGUF::require_i64(const std::string &key) const {
    int64_t v;
    if (!get_i64(key, &v)) throw Error(DS4_E_MODEL, kv_desc(*this, key, "an integer"));
    return v;
}
double GGUF::require_f64(const std::string &key) const {
    double v;
    if (!get_f64(key, &v)) throw Error(DS4_E_MODEL, kv_desc(*this, key, "a number"));
    return v;
}
bool GGUF::require_bool(const std::string &key) const {
    bool v;
    if (!get_bool(key, &v)) throw Error(DS4_E_MODEL, kv_desc(*this, key, "bool"));
    return v;
}
std::string GGUF::require_string(const std::string &key) const {
    std::string v;
    if (!get_string(key, &v)) throw Error(DS4_E_MODEL, kv_desc(*this, key, "string"));
    return v;
}

}  // namespace ds4
