// api.cpp: the C ABI of ds4.h for library info, GGUF access and the quant kernels.
// (Model and session functions live in api_model.cpp, the bandwidth probe in bandwidth.cpp.)
#include <memory>
#include <string>

#include "common.h"
#include "ds4.h"
#include "gguf.h"
#include "quant.h"

#ifndef DS4_ARCH_NAME
#define DS4_ARCH_NAME "cpu"
#endif

struct ds4_gguf {
    std::unique_ptr<ds4::GGUF> g;
};

namespace {

void fill_info(const ds4::TensorInfo &ti, ds4_tensor_info *out) {
    out->name = ti.name.c_str();
    out->type = ti.type;
    out->n_dims = ti.n_dims;
    for (int i = 0; i < 4; i++) out->ne[i] = ti.ne[i];
    out->offset = ti.offset;
    out->nbytes = ti.nbytes;
}


// The kernels' entry points run `cpu` for DS4_BACKEND_CPU and `cuda` for DS4_BACKEND_CUDA; a CUDA call in an engine
// built without CUDA, or another backend, is a clean error. DS4_CUDA_ONLY(call) compiles the call only with CUDA.
#ifdef DS4_WITH_CUDA
#define DS4_CUDA_ONLY(...) __VA_ARGS__
#else
#define DS4_CUDA_ONLY(...) \
    ds4::fail(DS4_E_BACKEND, "this engine was built without CUDA (rebuild with spark-setup build --arch auto)")
#endif
template <class Cpu, class Cuda>
void on_backend(int backend, Cpu &&cpu, Cuda &&cuda) {
    if (backend == DS4_BACKEND_CPU) cpu();
    else if (backend == DS4_BACKEND_CUDA) cuda();
    else ds4::fail(DS4_E_ARG, "unknown backend %d", backend);
}
}  // namespace

extern "C" {

int ds4_abi_version(void) { return DS4_ABI_VERSION; }

const char *ds4_version_string(void) {
#ifdef DS4_WITH_CUDA
    return "0.1.0 (cpu+cuda " DS4_ARCH_NAME ")";
#else
    return "0.1.0 (cpu)";
#endif
}

int ds4_has_cuda(void) {
#ifdef DS4_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

const char *ds4_last_error(void) { return ds4::last_error(); }

int ds4_gguf_open(const char *path, ds4_gguf **out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(path != nullptr && out != nullptr, "ds4_gguf_open: path and out must not be NULL");
        std::string err;
        int code = DS4_E_FORMAT;
        std::unique_ptr<ds4::GGUF> g = ds4::GGUF::open(path, &err, &code);
        if (!g) return ds4::set_error(code, "%s", err.c_str());
        auto *h = new ds4_gguf;
        h->g = std::move(g);
        *out = h;
        return (int)DS4_OK;
    });
}

void ds4_gguf_close(ds4_gguf *g) { delete g; }

int64_t ds4_gguf_n_tensors(const ds4_gguf *g) {
    if (!g) return ds4::set_error(DS4_E_ARG, "ds4_gguf_n_tensors: NULL handle");
    return (int64_t)g->g->tensors().size();
}

int64_t ds4_gguf_n_kv(const ds4_gguf *g) {
    if (!g) return ds4::set_error(DS4_E_ARG, "ds4_gguf_n_kv: NULL handle");
    return (int64_t)g->g->kvs().size();
}

uint32_t ds4_gguf_alignment(const ds4_gguf *g) {
    if (!g) {
        ds4::set_error(DS4_E_ARG, "ds4_gguf_alignment: NULL handle");
        return 0;
    }
    return g->g->alignment();
}

uint64_t ds4_gguf_data_offset(const ds4_gguf *g) {
    if (!g) {
        ds4::set_error(DS4_E_ARG, "ds4_gguf_data_offset: NULL handle");
        return 0;
    }
    return g->g->data_offset();
}

int ds4_gguf_tensor_at(const ds4_gguf *g, int64_t index, ds4_tensor_info *out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(g != nullptr && out != nullptr, "ds4_gguf_tensor_at: NULL argument");
        const auto &ts = g->g->tensors();
        DS4_CHECK_ARG(index >= 0 && (uint64_t)index < ts.size(), "tensor index %lld out of range (0..%zu)",
                      (long long)index, ts.size());
        fill_info(ts[(size_t)index], out);
        return (int)DS4_OK;
    });
}

int ds4_gguf_find_tensor(const ds4_gguf *g, const char *name, ds4_tensor_info *out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(g != nullptr && name != nullptr && out != nullptr, "ds4_gguf_find_tensor: NULL argument");
        const ds4::TensorInfo *ti = g->g->find(name);
        DS4_CHECK_ARG(ti != nullptr, "tensor '%s' not found in %s", name, g->g->path().c_str());
        fill_info(*ti, out);
        return (int)DS4_OK;
    });
}

const void *ds4_gguf_tensor_data(const ds4_gguf *g, const ds4_tensor_info *t) {
    return ds4::guard_value<const void *>(nullptr, [&]() -> const void * {
        DS4_CHECK_ARG(g != nullptr && t != nullptr, "ds4_gguf_tensor_data: NULL argument");
        uint64_t size = g->g->file_size();
        DS4_CHECK_ARG(t->offset <= size && t->nbytes <= size - t->offset,
                      "tensor range [%llu, +%llu) is outside the file", (unsigned long long)t->offset,
                      (unsigned long long)t->nbytes);
        return g->g->base() + t->offset;
    });
}

size_t ds4_row_bytes(int type, int64_t n_cols) { return ds4::row_bytes(type, n_cols); }

int ds4_dequantize(int type, const void *data, int64_t n_rows, int64_t n_cols, int64_t row_begin, int64_t row_end,
                   float *out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(data != nullptr && out != nullptr, "ds4_dequantize: NULL pointer");
        DS4_CHECK_ARG(0 <= row_begin && row_begin <= row_end && row_end <= n_rows,
                      "ds4_dequantize: row range [%lld, %lld) outside [0, %lld)", (long long)row_begin,
                      (long long)row_end, (long long)n_rows);
        ds4::cpu_dequant_rows(type, data, n_cols, row_begin, row_end, out);
        return (int)DS4_OK;
    });
}

int ds4_dequantize_backend(int backend, int type, const void *data, int64_t n_rows, int64_t n_cols,
                           int64_t row_begin, int64_t row_end, float *out) {
    if (backend == DS4_BACKEND_CPU) return ds4_dequantize(type, data, n_rows, n_cols, row_begin, row_end, out);
    return ds4::guard([&] {
        DS4_CHECK_ARG(data != nullptr && out != nullptr, "ds4_dequantize_backend: NULL pointer");
        DS4_CHECK_ARG(0 <= row_begin && row_begin <= row_end && row_end <= n_rows,
                      "ds4_dequantize_backend: row range [%lld, %lld) outside [0, %lld)", (long long)row_begin,
                      (long long)row_end, (long long)n_rows);
        on_backend(backend, [] {}, [&] {  // (DS4_BACKEND_CPU returned above)
            (void)type;
            DS4_CUDA_ONLY(ds4::cuda_dequant_host(type, data, n_cols, row_begin, row_end, out));
        });
        return (int)DS4_OK;
    });
}

int ds4_matvec(int backend, int type, const void *W, int64_t n_rows, int64_t n_cols, const float *x, float *y) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(W != nullptr && x != nullptr && y != nullptr, "ds4_matvec: NULL pointer");
        DS4_CHECK_ARG(n_rows >= 0, "ds4_matvec: negative row count");
        on_backend(backend, [&] { ds4::cpu_matvec(type, W, n_rows, n_cols, x, y); },
                   [&] { DS4_CUDA_ONLY(ds4::cuda_matvec_host(type, W, n_rows, n_cols, x, y)); });
        return (int)DS4_OK;
    });
}

int ds4_matmul(int backend, int type, const void *W, int64_t n_experts, int64_t n_rows, int64_t n_cols,
               const float *X, int64_t n_x, const int32_t *x_idx, const int32_t *off, int64_t n_tok, float *Y) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(W != nullptr && X != nullptr && Y != nullptr, "ds4_matmul: NULL pointer");
        DS4_CHECK_ARG(n_rows > 0 && n_x > 0 && n_tok > 0 && n_experts > 0, "ds4_matmul: empty or negative sizes");
        DS4_CHECK_ARG(off != nullptr || n_experts == 1, "ds4_matmul: several experts need off");
        if (off) {
            DS4_CHECK_ARG(off[0] == 0 && off[n_experts] == n_tok, "ds4_matmul: off must run from 0 to n_tok");
            for (int64_t e = 0; e < n_experts; e++) DS4_CHECK_ARG(off[e] <= off[e + 1], "ds4_matmul: off decreases");
        }
        for (int64_t j = 0; j < n_tok; j++)
            DS4_CHECK_ARG(x_idx ? x_idx[j] >= 0 && x_idx[j] < n_x : j < n_x, "ds4_matmul: slot %lld reads no X row",
                          (long long)j);
        const size_t mat = ds4::row_bytes(type, n_cols) * (size_t)n_rows;
        auto cpu = [&] {
            int64_t e = 0;
            for (int64_t j = 0; j < n_tok; j++) {
                while (off && j >= off[e + 1]) e++;
                ds4::cpu_matvec(type, static_cast<const uint8_t *>(W) + e * mat, n_rows, n_cols,
                                X + (x_idx ? x_idx[j] : j) * n_cols, Y + j * n_rows);
            }
        };
        on_backend(backend, cpu, [&] {
            DS4_CUDA_ONLY(ds4::cuda_mm6_host(type, W, n_experts, n_rows, n_cols, X, n_x, x_idx, off, n_tok, Y));
        });
        return (int)DS4_OK;
    });
}

}  // extern "C"
