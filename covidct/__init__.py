"""covidct: a COVID-19 lung-CT slice classifier built on minicnn.

Labels everywhere in covidct: COVID-19 positive = 1, negative = 0, and every
metric treats COVID as the positive class. (The UCSD COVID-CT code used the
opposite convention, 0 = COVID.)
"""
CLASS_NAMES = ("non-COVID", "COVID")
COVID, NON_COVID = 1, 0

__version__ = "0.1.0"
