# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""miniCBF byte-offset decompression (CBFlib's x-CBF_BYTE_OFFSET, as PILATUS writes it).

Each pixel is the previous value plus a delta: one signed byte, or 0x80 then a little-endian int16,
or 0x8000 then an int32, or 0x80000000 then an int64. The Python wrapper is
`intxr.images.byte_offset_decode`; `intxr.images.byte_offset_decode_reference` is the plain version.
"""
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t
from libc.string cimport memcpy


cdef Py_ssize_t _decode(const uint8_t[::1] src, int32_t[::1] out) noexcept nogil:
    # Returns the number of pixels written, or -1 when the stream ends mid-delta.
    cdef Py_ssize_t pos = 0, n = 0, size = src.shape[0], nout = out.shape[0]
    cdef int64_t value = 0
    cdef int8_t d8
    cdef int16_t d16
    cdef int32_t d32
    cdef int64_t d64
    while n < nout and pos < size:
        d8 = <int8_t>src[pos]
        pos += 1
        if d8 != -128:
            value += d8
        else:
            if pos + 2 > size:
                return -1
            memcpy(&d16, &src[pos], 2)  # little-endian host (x86-64, aarch64)
            pos += 2
            if d16 != -32768:
                value += d16
            else:
                if pos + 4 > size:
                    return -1
                memcpy(&d32, &src[pos], 4)
                pos += 4
                if d32 != -2147483648:
                    value += d32
                else:
                    if pos + 8 > size:
                        return -1
                    memcpy(&d64, &src[pos], 8)
                    pos += 8
                    value += d64
        out[n] = <int32_t>value
        n += 1
    return n


def byte_offset_decode_into(const uint8_t[::1] src not None, int32_t[::1] out not None):
    """Decode into `out`; returns how many pixels were written (less than out.size if src ran out)."""
    cdef Py_ssize_t n
    with nogil:
        n = _decode(src, out)
    if n < 0:
        raise ValueError("byte-offset stream truncated in the middle of a delta")
    return n
