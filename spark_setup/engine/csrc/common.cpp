// common.cpp: thread-local last error and string formatting.
#include "common.h"

#include <cstdio>
#include <vector>

namespace ds4 {

namespace {
thread_local std::string t_last_error;
}

std::string vstrfmt(const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = std::vsnprintf(nullptr, 0, fmt, ap2);
    va_end(ap2);
    if (n <= 0) return std::string();
    std::vector<char> buf((size_t)n + 1);
    std::vsnprintf(buf.data(), buf.size(), fmt, ap);
    return std::string(buf.data(), (size_t)n);
}

std::string strfmt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vstrfmt(fmt, ap);
    va_end(ap);
    return s;
}

int set_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    try {
        std::string s = vstrfmt(fmt, ap);
        // One printable line: the ABI promises a single-line message (names from a corrupt file may hold anything).
        for (char &c : s)
            if ((unsigned char)c < 0x20 || c == 0x7f) c = '?';
        t_last_error = std::move(s);
    } catch (...) {
        t_last_error.clear();
    }
    va_end(ap);
    return code;
}

void clear_error() { t_last_error.clear(); }

const char *last_error() { return t_last_error.c_str(); }

void fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vstrfmt(fmt, ap);
    va_end(ap);
    throw Error(code, s);
}

}  // namespace ds4
