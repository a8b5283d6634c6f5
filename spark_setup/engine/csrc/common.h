// common.h: error plumbing shared by every engine source file.
//
// Every C ABI function body runs inside ds4::guard(...): C++ exceptions never cross the boundary; a thrown
// ds4::Error becomes its code + message in the thread-local last error (ds4_last_error()).
#pragma once

#include <cstdarg>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>

#include "ds4.h"

#if defined(__GNUC__)
#define DS4_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define DS4_PRINTF(a, b)
#endif

namespace ds4 {

// Set the thread-local last error (one line, printf-style) and return `code` (a negative DS4_E_*).
int set_error(int code, const char *fmt, ...) DS4_PRINTF(2, 3);
void clear_error();
const char *last_error();  // "" when none

// printf into a std::string.
std::string strfmt(const char *fmt, ...) DS4_PRINTF(1, 2);
std::string vstrfmt(const char *fmt, va_list ap);

// The one exception type engine code throws; guard() turns it into (code, message).
class Error : public std::runtime_error {
public:
    Error(int code, const std::string &msg) : std::runtime_error(msg), code_(code) {}
    int code() const { return code_; }

private:
    int code_;
};

// Throw ds4::Error(code, printf-style message).
[[noreturn]] void fail(int code, const char *fmt, ...) DS4_PRINTF(2, 3);

// Run an ABI body that returns int (DS4_OK or a DS4_E_* code); every exception becomes an error code.
// Usage: int ds4_foo(...) { return ds4::guard([&] { ...; return DS4_OK; }); }
template <class F>
int guard(F &&body) noexcept {
    try {
        return body();
    } catch (const Error &e) {
        return set_error(e.code(), "%s", e.what());
    } catch (const std::bad_alloc &) {
        return set_error(DS4_E_NOMEM, "out of memory");
    } catch (const std::exception &e) {
        return set_error(DS4_E_ARG, "internal error: %s", e.what());
    } catch (...) {
        return set_error(DS4_E_ARG, "internal error: unknown exception");
    }
}

// Same for ABI functions returning a value (pointer, count): `fallback` is returned on any failure.
template <class T, class F>
T guard_value(T fallback, F &&body) noexcept {
    try {
        return body();
    } catch (const Error &e) {
        set_error(e.code(), "%s", e.what());
    } catch (const std::bad_alloc &) {
        set_error(DS4_E_NOMEM, "out of memory");
    } catch (const std::exception &e) {
        set_error(DS4_E_ARG, "internal error: %s", e.what());
    } catch (...) {
        set_error(DS4_E_ARG, "internal error: unknown exception");
    }
    return fallback;
}

// Argument check helper for ABI bodies: throws DS4_E_ARG with the message when cond is false.
#define DS4_CHECK_ARG(cond, ...)                              \
    do {                                                      \
        if (!(cond)) ::ds4::fail(DS4_E_ARG, __VA_ARGS__);     \
    } while (0)

}  // namespace ds4
