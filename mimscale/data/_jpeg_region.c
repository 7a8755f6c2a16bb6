/* Decode only the part of a JPEG that a crop needs (libjpeg-turbo's partial decompression).
 *
 * RandomResizedCrop keeps 20-100% of an image; a full decode spends its IDCT, upsampling and colour
 * conversion on every pixel and its entropy decoding on every row. Here:
 *   - rows below the crop are never decoded (the decode stops after the crop's last row);
 *   - rows above it are skipped with jpeg_skip_scanlines (entropy decoding only);
 *   - columns outside it are cut by jpeg_crop_scanline (no IDCT or colour conversion for them);
 *   - libjpeg's M/8 scaling (M = 1, 2, 4, 8) happens inside the IDCT, as in a full reduced decode.
 * The pixels are those of a full decode at the same scale and DCT method (tests/unit/test_jpeg_region.py
 * checks equality on real JPEGs): callers get the same crops, only faster.
 *
 * One plain C entry point, mimscale_decode_region, called through ctypes from Python
 * (mimscale/data/jpeg_region.py) and from FFCV's numba-compiled decoder; it allocates nothing the
 * caller must free and keeps no state, so any number of threads may call it at once.
 *
 * The file is also a (method-less) Python extension module so setuptools builds and installs it
 * with the package; mimscale/data/jpeg_region.py finds it by its import name.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* Return codes (negative: the caller falls back to another decoder). */
#define MR_OK 0
#define MR_ERROR -1      /* libjpeg error (corrupt, truncated, unsupported) */
#define MR_WARNING -2    /* decodable only with warnings (strict mode: let a stricter decoder decide) */
#define MR_COLORSPACE -3 /* not YCbCr/RGB/gray (CMYK, YCCK): needs a conversion libjpeg does not do */
#define MR_BOX -4        /* the box is empty or outside the scaled image */
#define MR_CAPACITY -5   /* the output buffer is too small */

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) {
    struct error_mgr *err = (struct error_mgr *)cinfo->err;
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* level < 0: a warning (corrupt data libjpeg recovered from); counted, never printed */
    if (level < 0) cinfo->err->num_warnings++;
}

/* An end-of-image marker (FF D9) in the last 64 bytes: encoders may append a little padding. */
static int has_eoi(const unsigned char *data, unsigned long size) {
    unsigned long start = size > 64 ? size - 64 : 0;
    for (unsigned long i = size; i > start + 1; i--)
        if (data[i - 2] == 0xFF && data[i - 1] == 0xD9) return 1;
    return 0;
}

/* Decode the rows [y0, y1) and at least the columns [x0, x1) of the image scaled by m/8
 * (coordinates in scaled pixels, the box clipped to the scaled image).
 *
 * out: RGB bytes, row-major with row stride = the decoded region's width * 3; capacity out_cap.
 * info[0..3] on success: rx0, ry0, rw, rh (the decoded region: columns [rx0, rx0 + rw) may extend
 * past [x0, x1) to whole iMCU columns, rows are exactly [y0, y1)); info[4..5]: the scaled image's
 * width and height (set once the header is read, also when the call then fails).
 * A capacity of (y1 - y0) * scaled_width * 3 always suffices.
 * fast: 1 = libjpeg's fast integer IDCT (FFCV's choice), 0 = the accurate one (simplejpeg's default).
 * strict: 1 = a decode with warnings fails with MR_WARNING. */
int mimscale_decode_region(const unsigned char *data, unsigned long size, int m, int x0, int y0, int x1, int y1,
                           unsigned char *out, unsigned long out_cap, int fast, int strict, int *info) {
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;

    /* strict: a file cut short (no end-of-image marker near its end) fails as a full decode would,
     * although the rows below the crop, where the damage is, are never read */
    if (strict && !has_eoi(data, size)) return MR_WARNING;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return MR_ERROR;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_RGB &&
        cinfo.jpeg_color_space != JCS_GRAYSCALE) {
        jpeg_destroy_decompress(&cinfo);
        return MR_COLORSPACE;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = (unsigned int)m;
    cinfo.scale_denom = 8;
    cinfo.dct_method = fast ? JDCT_IFAST : JDCT_ISLOW;
    jpeg_start_decompress(&cinfo);

    int width = (int)cinfo.output_width, height = (int)cinfo.output_height;
    info[4] = width; /* set first: a caller whose buffer was too small can size the next one */
    info[5] = height;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > width) x1 = width;
    if (y1 > height) y1 = height;
    if (x1 <= x0 || y1 <= y0) {
        jpeg_destroy_decompress(&cinfo);
        return MR_BOX;
    }
    JDIMENSION rx0 = (JDIMENSION)x0, rw = (JDIMENSION)(x1 - x0);
    /* widens the columns to whole iMCUs: rx0 may move left, rw grow */
    if (rw < (JDIMENSION)width) jpeg_crop_scanline(&cinfo, &rx0, &rw);
    else rx0 = 0, rw = (JDIMENSION)width;
    unsigned long stride = (unsigned long)rw * 3;
    if (stride * (unsigned long)(y1 - y0) > out_cap) {
        jpeg_destroy_decompress(&cinfo);
        return MR_CAPACITY;
    }
    if (y0 > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0) != (JDIMENSION)y0) {
        jpeg_destroy_decompress(&cinfo);
        return MR_ERROR;
    }
    for (int y = y0; y < y1;) {
        JSAMPROW row = out + (unsigned long)(y - y0) * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, &row, 1);
        if (got == 0) { /* data ran out (a suspending source never does this; be safe) */
            jpeg_destroy_decompress(&cinfo);
            return MR_ERROR;
        }
        y += (int)got;
    }
    int warnings = (int)err.pub.num_warnings;
    /* the rows below the crop are not needed: abort instead of jpeg_finish_decompress */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    if (strict && warnings > 0) return MR_WARNING;
    info[0] = (int)rx0;
    info[1] = y0;
    info[2] = (int)rw;
    info[3] = y1 - y0;
    return MR_OK;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "mimscale_decode_region (ctypes entry point): see mimscale/data/jpeg_region.py",
                                    -1, NULL};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
