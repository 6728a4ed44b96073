from . import kaldi as kaldi
