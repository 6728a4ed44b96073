from . import compliance as compliance
from . import transforms as transforms
