"""Radiograph physics: cone-beam projection of voxel volumes (``projection``), X-ray spectra,
attenuation, scatter and detector (``xray``), and the display processing of CR/DX systems
(``processing``); compressed-sensing measurement
operators: block CS and Cartesian MRI (``measurements``)."""
