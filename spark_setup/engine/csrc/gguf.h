// gguf.h: read-only, mmap-backed GGUF v3 reader. Every offset and size is bounds-checked against the file
// size at open(); after a successful open, all getters are safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace ds4 {

// GGUF metadata value types (gguf spec).
enum GGUFValueType : uint32_t {
    GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3, GGUF_U32 = 4, GGUF_I32 = 5, GGUF_F32 = 6,
    GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10, GGUF_I64 = 11, GGUF_F64 = 12,
};
const char *gguf_value_type_name(uint32_t t);

struct TensorInfo {
    std::string name;
    int32_t type = 0;     // ds4_type / GGML type id
    int32_t n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // innermost first; unused dims = 1
    uint64_t offset = 0;  // absolute offset in the file
    uint64_t nbytes = 0;
    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

struct KVInfo {
    std::string key;
    uint32_t type = 0;       // GGUFValueType
    uint32_t arr_type = 0;   // element type when type == GGUF_ARRAY
    uint64_t arr_n = 0;      // element count when type == GGUF_ARRAY
    uint64_t value_off = 0;  // offset of the value (for arrays: of the first element) in the file
};

class GGUF {
public:
    // mmap + validate header, every key/value, the tensor table, alignment, data offset and every tensor's
    // byte range. On failure returns nullptr, writes a one-line message to *err and, if code != nullptr,
    // DS4_E_IO (cannot open/map) or DS4_E_FORMAT (malformed) to *code.
    static std::unique_ptr<GGUF> open(const std::string &path, std::string *err, int *code = nullptr);
    ~GGUF();
    GGUF(const GGUF &) = delete;
    GGUF &operator=(const GGUF &) = delete;

    const std::string &path() const { return path_; }
    uint32_t version() const { return version_; }
    uint32_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }
    uint64_t file_size() const { return size_; }
    const uint8_t *base() const { return base_; }

    // ---- metadata ----
    const std::vector<KVInfo> &kvs() const { return kvs_; }
    const KVInfo *kv(const std::string &key) const;  // nullptr if absent
    bool has(const std::string &key) const { return kv(key) != nullptr; }

    // Scalar getters: false if absent or not convertible (integers of any width convert when the value fits;
    // get_f64 also accepts integers; get_bool only bool). *out is written only on success.
    bool get_u32(const std::string &key, uint32_t *out) const;
    bool get_i64(const std::string &key, int64_t *out) const;
    bool get_f64(const std::string &key, double *out) const;
    bool get_bool(const std::string &key, bool *out) const;
    bool get_string(const std::string &key, std::string *out) const;
    // Array getters (elements converted like the scalars above; false if absent, not an array or not convertible).
    bool get_ints(const std::string &key, std::vector<int64_t> *out) const;
    bool get_floats(const std::string &key, std::vector<float> *out) const;
    bool get_strings(const std::string &key, std::vector<std::string> *out) const;
    // Number of elements of an array key (0 if absent / not an array).
    uint64_t array_len(const std::string &key) const;

    // Throwing variants (ds4::Error with DS4_E_MODEL: "GGUF key 'k' is missing or not <type>").
    uint32_t require_u32(const std::string &key) const;
    int64_t require_i64(const std::string &key) const;
    double require_f64(const std::string &key) const;
    bool require_bool(const std::string &key) const;
    std::string require_string(const std::string &key) const;

    // ---- tensors ----
    const std::vector<TensorInfo> &tensors() const { return tensors_; }
    const TensorInfo *find(const std::string &name) const;  // nullptr if absent
    const uint8_t *data(const TensorInfo &ti) const { return base_ + ti.offset; }

private:
    GGUF() = default;
    bool parse(std::string *err);

    std::string path_;
    int fd_ = -1;
    const uint8_t *base_ = nullptr;
    uint64_t size_ = 0;
    uint32_t version_ = 0;
    uint32_t alignment_ = 32;
    uint64_t data_offset_ = 0;
    std::vector<KVInfo> kvs_;
    std::unordered_map<std::string, size_t> kv_index_;
    std::vector<TensorInfo> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace ds4
