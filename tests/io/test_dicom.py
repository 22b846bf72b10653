"""DICOM reader: display pipeline against hand-computed values, and specific errors.

Fixtures are pydicom's own test files and the pydicom-data package, so the
expected values below come from the DICOM standard's formulas applied by hand,
not from re-running our reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import ExplicitVRLittleEndian

import data_store
from medsight.errors import (
    DecoderUnavailableError,
    EmptyFileError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedPixelDataError,
    UnsupportedImageError,
)
from medsight.io import read_dicom, read_dicom_frames
from medsight.io.dicom import parse_age

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA_STORE = Path(data_store.__file__).parent / "data"


def pydicom_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, name
    return path


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 "LINEAR" window, output already in [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# --------------------------------------------------------------------------- grayscale pipeline


def test_cr_chest_is_grayscale_and_monochrome1_is_inverted():
    path = DATA_STORE / "RG1_UNCR.dcm"
    image = read_dicom(path)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert image.channels == 1 and image.pixels.shape == (ds.Rows, ds.Columns, 1)

    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # The window's output range is 0 .. 2**BitsStored - 1 (PS3.3 C.11.2.1.2);
    # scaling by it (not by the image's own min/max) keeps the site's contrast.
    expected = 1.0 - windowed / (2**ds.BitsStored - 1)
    np.testing.assert_allclose(image.pixels[..., 0], expected, atol=1e-5)
    # Same ordering as the naive "1 - minmax(...)": only the stretch differs.
    naive = 1.0 - (windowed - windowed.min()) / (windowed.max() - windowed.min())
    assert np.corrcoef(image.pixels[..., 0].ravel(), naive.ravel())[0, 1] > 0.9999
    # Lungs (air, low raw values) must come out dark on an inverted CR.
    assert image.pixels[..., 0].mean() > 0.5


def test_monochrome1_is_the_inverse_of_the_same_data_as_monochrome2(tmp_path):
    src = pydicom_file("6154")  # 16x16 MONOCHROME1 CR from pydicom's DICOMDIR tests
    ds = pydicom.dcmread(src)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    as_m2 = tmp_path / "m2.dcm"
    ds.save_as(as_m2)
    np.testing.assert_allclose(read_dicom(src).pixels + read_dicom(as_m2).pixels, 1.0, atol=1e-6)


def test_ct_rescale_is_applied_before_a_window_in_hounsfield_units(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window, in HU
    path = tmp_path / "ct_window.dcm"
    ds.save_as(path)

    image = read_dicom(path)
    hu = ds.pixel_array * 1.0 - 1024.0
    np.testing.assert_allclose(image.pixels[..., 0], linear_window(hu, 40, 400), atol=1e-6)
    # Windowing raw stored values instead would give a visibly different image.
    assert np.abs(linear_window(ds.pixel_array * 1.0, 40, 400) - image.pixels[..., 0]).mean() > 0.1
    assert image.meta["modality"] == "CT"


def test_ct_without_window_is_min_max_of_rescaled_values():
    image = read_dicom(pydicom_file("CT_small.dcm"))
    raw = pydicom.dcmread(pydicom_file("CT_small.dcm")).pixel_array.astype(np.float64)
    np.testing.assert_allclose(image.pixels[..., 0], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)


def test_enhanced_ct_takes_rescale_and_window_from_functional_groups():
    path = pydicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    rescale = shared.PixelValueTransformationSequence[0]
    window = shared.FrameVOILUTSequence[0]
    frames = read_dicom_frames(path)
    assert len(frames) == 2
    for i, frame in enumerate(frames):
        hu = ds.pixel_array[i] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
        expected = linear_window(hu, float(window.WindowCenter), float(window.WindowWidth))
        np.testing.assert_allclose(frame.pixels[..., 0], expected, atol=1e-6)


def test_voi_lut_sequence_is_preferred_and_scaled_by_the_lut_range():
    path = pydicom_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    out = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    np.testing.assert_allclose(read_dicom(path).pixels[..., 0], (out - lut.min()) / (lut.max() - lut.min()), atol=1e-6)


def test_modality_lut_sequence_is_applied():
    path = pydicom_file("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    out = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    np.testing.assert_allclose(read_dicom(path).pixels[..., 0], (out - out.min()) / (out.max() - out.min()), atol=1e-6)


# --------------------------------------------------------------------------- frames and colour


def test_multiframe_gives_every_frame_and_middle_by_default():
    path = pydicom_file("emri_small.dcm")
    frames = read_dicom_frames(path)
    assert len(frames) == 10
    assert [f.meta["frame_index"] for f in frames] == list(range(10))
    assert all(f.meta["n_frames"] == 10 and f.pixels.shape == (64, 64, 1) for f in frames)
    middle = read_dicom(path)
    assert middle.meta["frame_index"] == 5
    np.testing.assert_array_equal(middle.pixels, frames[5].pixels)
    np.testing.assert_array_equal(read_dicom(path, frame=0).pixels, frames[0].pixels)
    with pytest.raises(IndexError):
        read_dicom(path, frame=10)


def test_compressed_multiframe_matches_uncompressed():
    reference = read_dicom_frames(pydicom_file("emri_small.dcm"))
    for name in ("emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        frames = read_dicom_frames(pydicom_file(name))
        assert len(frames) == 10, name
        np.testing.assert_array_equal(frames[3].pixels, reference[3].pixels)


def test_ybr_jpeg_comes_out_rgb_without_double_conversion():
    reference = read_dicom(pydicom_file("SC_rgb.dcm")).pixels  # uncompressed RGB colour bars
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_uncompressed.dcm"):
        assert pydicom.dcmread(pydicom_file(name)).PhotometricInterpretation.startswith("YBR_FULL"), name
        image = read_dicom(pydicom_file(name))
        assert image.channels == 3, name
        assert np.abs(image.pixels - reference).mean() < 0.02, name
    # The tolerance above would catch a second YCbCr->RGB conversion:
    twice = convert_color_space((reference * 255).astype(np.uint8), "YBR_FULL", "RGB") / 255.0
    assert np.abs(twice - reference).mean() > 0.05


def test_jpeg2000_ybr_rct_is_lossless_rgb():
    lossless = read_dicom(DATA_STORE / "US1_J2KR.dcm")
    np.testing.assert_array_equal(lossless.pixels, read_dicom(DATA_STORE / "US1_UNCR.dcm").pixels)
    assert lossless.channels == 3


@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "gdcm-US-ALOKA-16.dcm"])
def test_palette_colour_becomes_rgb(name):
    path = DATA_STORE / name
    image = read_dicom(path)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    rgb = apply_color_lut(ds.pixel_array, ds)[..., :3].astype(np.float64)
    top = 255.0 if rgb.max() <= 255 else 65535.0
    assert image.channels == 3
    np.testing.assert_allclose(image.pixels, rgb / top, atol=1e-6)


def test_16_and_32_bit_rgb_scale_by_bit_depth():
    reference = read_dicom(pydicom_file("SC_rgb.dcm")).pixels
    for name in ("SC_rgb_16bit.dcm", "SC_rgb_32bit.dcm", "SC_rgb_expb_16bit.dcm"):
        np.testing.assert_allclose(read_dicom(pydicom_file(name)).pixels, reference, atol=1e-6)


def test_preamble_less_dicom_is_read_with_force_fallback():
    path = DATA_STORE / "OT-PAL-8-face.dcm"
    assert path.read_bytes()[128:132] != b"DICM"
    image = read_dicom(path)
    assert image.channels == 3
    assert image.meta["transfer_syntax_uid"] == "1.2.840.10008.1.2"  # inferred: implicit VR little endian


# --------------------------------------------------------------------------- metadata


def test_meta_has_identifiers_but_no_patient_identity():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    meta = read_dicom(path).meta
    assert meta["format"] == "dicom" and meta["source"] == str(path)
    assert meta["study_instance_uid"] == ds.StudyInstanceUID
    assert meta["series_instance_uid"] == ds.SeriesInstanceUID
    assert meta["sop_instance_uid"] == ds.SOPInstanceUID
    assert meta["sop_class_uid"] == ds.SOPClassUID
    assert (meta["rows"], meta["columns"], meta["n_frames"], meta["frame_index"]) == (128, 128, 1, 0)
    assert meta["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
    assert meta["photometric_interpretation"] == "MONOCHROME2"
    assert meta["patient_age"] == 0 and meta["patient_sex"] == "O"
    flat = " ".join(str(v) for v in meta.values())
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(ds.get(keyword, "")).strip()
        if value:
            assert value not in flat, keyword
    assert not {"patient_name", "patient_id", "patient_birth_date"} & meta.keys()


@pytest.mark.parametrize(
    ("text", "years"),
    [("045Y", 45), ("006M", 0), ("018M", 1), ("104W", 2), ("400D", 1), ("", None), ("abc", None), (None, None)],
)
def test_parse_age(text, years):
    assert parse_age(text) == years


# --------------------------------------------------------------------------- specific errors


def _raises(error, path):
    with pytest.raises(error) as info:
        read_dicom(path)
    assert str(path) in str(info.value)
    return info.value


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.touch()
    _raises(EmptyFileError, path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("Patient was seen on Monday. Nothing to report.\n" * 20)
    _raises(NotAnImageError, path)


def test_deleted_pixel_data(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "no_pixels.dcm"
    ds.save_as(path)
    _raises(NoPixelDataError, path)


def test_structured_report_has_no_pixel_data():
    error = _raises(NoPixelDataError, pydicom_file("test-SR.dcm"))
    assert "SR" in error.detail


def test_truncated_native_pixel_data(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del ds[0xFFFCFFFC]  # trailing padding: make Pixel Data the last element
    whole = tmp_path / "whole.dcm"
    ds.save_as(whole)
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole.read_bytes()[:-1000])
    _raises(TruncatedPixelDataError, path)


def test_truncated_compressed_pixel_data(tmp_path):
    data = Path(pydicom_file("emri_small_jpeg_2k_lossless.dcm")).read_bytes()
    path = tmp_path / "cut_j2k.dcm"
    path.write_bytes(data[:-5000])
    _raises(TruncatedPixelDataError, path)


def test_transfer_syntax_without_decoder_is_named(tmp_path):
    ds = pydicom.dcmread(pydicom_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile
    path = tmp_path / "mpeg2.dcm"
    ds.save_as(path)
    error = _raises(DecoderUnavailableError, path)
    assert "1.2.840.10008.1.2.4.100" in error.detail and "MPEG2" in error.detail


def test_missing_decoder_plugins_map_to_decoder_unavailable(monkeypatch):
    import medsight.io.dicom as dicom_module

    class NoPlugins:
        def as_array(self, *args, **kwargs):
            raise RuntimeError("Unable to decompress 'JPEG 2000' pixel data because all plugins are missing dependencies:\n\tgdcm - requires gdcm")

    monkeypatch.setattr(dicom_module, "get_decoder", lambda uid: NoPlugins())
    error = _raises(DecoderUnavailableError, pydicom_file("MR_small_jp2klossless.dcm"))
    assert "JPEG 2000" in error.detail


def test_two_samples_per_pixel_is_unsupported(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SamplesPerPixel = 2
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "two_samples.dcm"
    ds.save_as(path)
    error = _raises(UnsupportedImageError, path)
    assert "SamplesPerPixel=2" in error.detail


def test_failures_inside_decoders_are_specific():
    # A 12-bit lossy JPEG that none of the installed plugins decodes.
    error = _raises(UnsupportedImageError, pydicom_file("JPEG-lossy.dcm"))
    assert "JPEG Extended" in error.detail
    _raises(TruncatedPixelDataError, pydicom_file("MR_truncated.dcm"))



@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "US1_J2KI.dcm", "MR_small_jp2klossless.dcm"])
def test_jpeg2000_through_the_preferred_plugin_gives_gdcms_pixels(name, monkeypatch):
    """JPEG 2000 is decoded by Pillow's (multi-threaded) OpenJPEG first: same image as GDCM's decode."""
    from medsight.io.dicom import PREFERRED_PLUGIN

    path = pydicom_file(name)
    assert PREFERRED_PLUGIN[pydicom.dcmread(path).file_meta.TransferSyntaxUID] == "pillow"
    fast = read_dicom(path)
    monkeypatch.setitem(PREFERRED_PLUGIN, pydicom.dcmread(path).file_meta.TransferSyntaxUID, "gdcm")
    np.testing.assert_array_equal(fast.pixels, read_dicom(path).pixels)


def test_jpeg2000_the_preferred_plugin_cannot_read_falls_back_to_the_others():
    # Pillow's OpenJPEG refuses this GDCM-written codestream; GDCM reads it.
    image = read_dicom(pydicom_file("GDCMJ2K_TextGBR.dcm"))
    assert image.pixels.shape == (400, 400, 3) and image.pixels.max() > 0
